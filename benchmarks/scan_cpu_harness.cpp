// Standalone timing of the native fused scan forward (kernels/cpu/csrc/scan_cpu.cpp), for comparing
// kernel variants on a noisy machine: the minimum over many calls of a C++ loop is steady to a few
// percent where Python-level medians move by 2x. Build against the source (or a modified copy):
//
//   g++ -O3 -march=native -ffp-contract=fast -fopenmp -std=c++17 \
//       benchmarks/scan_cpu_harness.cpp -o /tmp/scan_harness
//   (a variant: add -DSRC='"/absolute/path/variant.cpp"')
//   /tmp/scan_harness D H W R THREADS REPS [BLOCK]      # e.g. 96 16 16 6 1 3000 (in cache)
//
// Prints min / 10th percentile / median microseconds per call and ns per (8-channel vector, step)
// per thread at the minimum. Random inputs of the model's scale, batch 1, N = 1, one route group.
#ifndef SRC
#define SRC "../kernels/cpu/csrc/scan_cpu.cpp"
#endif
#include SRC
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <algorithm>
#include <vector>
int main(int argc, char** argv) {
  if (argc < 7) {
    fprintf(stderr, "usage: %s D H W R THREADS REPS [BLOCK]\n", argv[0]);
    return 2;
  }
  int B = 1, D = atoi(argv[1]), H = atoi(argv[2]), W = atoi(argv[3]), R = atoi(argv[4]), threads = atoi(argv[5]), reps = atoi(argv[6]);
  int block = argc > 7 ? atoi(argv[7]) : D;
  const int N = 1, L = H * W, G = 4, width = R + 2 * N;
  std::mt19937 rng(0); std::normal_distribution<float> nd(0, 1);
  std::vector<float> u(size_t(B) * L * D), proj(size_t(B) * L * G * width), wdt(size_t(G) * R * D), bias(G * D), A(G * N * D), Dv(G * D), y(size_t(B) * L * D);
  for (auto& v : u) v = nd(rng);
  for (auto& v : proj) v = nd(rng) * 0.3f;
  for (auto& v : wdt) v = nd(rng) / std::sqrt(float(R));
  for (auto& v : bias) v = nd(rng) * 0.5f - 3.f;
  for (auto& v : A) v = -std::exp(nd(rng) * 0.3f);
  for (auto& v : Dv) v = 1.f;
  Problem P{};
  P.batch = B; P.length = L; P.height = H; P.width = W; P.channels = D; P.groups = 4; P.group_channels = D;
  P.d_state = N; P.rank = R; P.block = block; P.chunk = 64; P.fused = 1; P.softplus = 1; P.num_threads = threads;
  P.u = u.data(); P.proj = proj.data(); P.wdt = wdt.data(); P.bias = bias.data(); P.A = A.data(); P.D = Dv.data(); P.y = y.data();
  std::vector<double> ts;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    if (vmamba_scan_forward(&P)) { printf("error\n"); return 1; }
    ts.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  double vsteps = double(B) * L * 4 * ((D + 7) / 8);
  printf("min %.1f us  p10 %.1f  med %.1f  | %.2f ns/vector-step/thread (min)  checksum %.6g\n", ts[0], ts[reps / 10], ts[reps / 2],
         ts[0] * 1e3 / vsteps * threads, (double)y[123]);
}
