// All-reduce through shared memory, for ranks on one host: the tensor-parallel
// ranks' two sums per layer cost microseconds instead of a TCP round trip.
//
// Segment layout (set up by pllm/platforms/common/shm.py):
//   header: int64 words, one 64-byte line per rank: [0] = the last step the
//           rank has published, [1] = its pid, [3] = 1 once it gave up (timeout,
//           peer gone), [4 + step % 2] = the element count of the call that
//           step belongs to (by parity, like the slots: a rank already one step
//           ahead must not overwrite what a slower one is about to compare)
//   data:   float [2][world][capacity]: each rank's slot, double-buffered by
//           step parity
//
// Step s: copy my chunk into slot[s % 2][rank]; publish s (release); wait until
// every rank has published s (acquire); sum the slots in rank order, so every
// rank gets the same bits. A rank writes slot[s % 2] again only at step s + 2,
// after every rank published s + 1, i.e. after every rank finished reading s.

#include <torch/extension.h>

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { __asm__ __volatile__("yield"); }
#else
static inline void cpu_relax() {}
#endif

namespace {

constexpr int64_t kLine = 8;  // int64 words per rank in the header (one cache line)

[[noreturn]] void give_up(int64_t* header, int64_t rank, const std::string& why) {
  __atomic_store_n(header + rank * kLine + 3, 1, __ATOMIC_RELEASE);  // peers stop waiting on us
  throw std::runtime_error("shared-memory all-reduce: " + why);
}

void wait_for_peers(int64_t* header, int64_t rank, int64_t world, int64_t step, int64_t n,
                    double timeout_s) {
  auto start = std::chrono::steady_clock::now();
  for (int64_t k = 0; k < world; ++k) {
    if (k == rank) continue;
    int64_t* line = header + k * kLine;
    int64_t spins = 0;
    while (__atomic_load_n(line, __ATOMIC_ACQUIRE) < step) {
      if (__atomic_load_n(line + 3, __ATOMIC_ACQUIRE)) {
        give_up(header, rank, "rank " + std::to_string(k) + " gave up");
      }
      if (++spins < 4096) {
        cpu_relax();
        continue;
      }
      std::this_thread::yield();  // more ranks than cores: let the peer run
      if ((spins & 4095) == 0) {
        int64_t pid = __atomic_load_n(line + 1, __ATOMIC_RELAXED);
        if (pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0) {
          give_up(header, rank, "rank " + std::to_string(k) + " (pid " + std::to_string(pid) + ") is gone");
        }
        double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (waited > timeout_s) {
          give_up(header, rank, "rank " + std::to_string(k) + " did not arrive within " +
                                    std::to_string(timeout_s) + " s");
        }
      }
    }
    int64_t theirs = __atomic_load_n(line + 4 + (step & 1), __ATOMIC_RELAXED);  // ordered by the acquire above
    if (theirs != n) {
      give_up(header, rank, "rank " + std::to_string(rank) + " reduces " + std::to_string(n) +
                                " elements, rank " + std::to_string(k) + " " + std::to_string(theirs));
    }
  }
}

}  // namespace

// Sums contiguous fp32 ``x`` over the ranks, in place; returns the next step
// number. ``header`` (int64) and ``data`` (fp32) view the shared segment.
int64_t shm_all_reduce_(torch::Tensor x, torch::Tensor header, torch::Tensor data, int64_t rank,
                        int64_t world, int64_t capacity, int64_t step, double timeout_s) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32");
  TORCH_CHECK(data.numel() >= 2 * world * capacity, "segment smaller than 2 x world x capacity");
  float* values = x.data_ptr<float>();
  int64_t* head = header.data_ptr<int64_t>();
  float* slots = data.data_ptr<float>();
  const int64_t n = x.numel();
  pybind11::gil_scoped_release no_gil;  // other threads of this process keep running
  for (int64_t lo = 0; lo < n; lo += capacity, ++step) {
    const int64_t len = std::min(capacity, n - lo);
    float* buffers = slots + (step & 1) * world * capacity;
    std::memcpy(buffers + rank * capacity, values + lo, len * sizeof(float));
    __atomic_store_n(head + rank * kLine + 4 + (step & 1), n, __ATOMIC_RELAXED);  // the whole call's size
    __atomic_store_n(head + rank * kLine, step, __ATOMIC_RELEASE);
    wait_for_peers(head, rank, world, step, n, timeout_s);
    float* out = values + lo;
    std::memcpy(out, buffers, len * sizeof(float));
    for (int64_t k = 1; k < world; ++k) {
      const float* part = buffers + k * capacity;
      for (int64_t i = 0; i < len; ++i) out[i] += part[i];
    }
  }
  return step;
}
