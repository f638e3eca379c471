// Scratch memory for one native call: the calling thread's kept buffer up to kKeepMax (a fresh
// multi-MB buffer per call costs thousands of page faults: 16 MB = 4096 faults, ~2 ms), the call's own
// allocation above. Used by the GEMM drivers (gemm.cpp, gemm_amx.cpp) and the AMX attention. Header-only.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace pk::cpu {

// A buffer kept between calls (declare it thread_local; one per use that can be live at the same time),
// grown on demand; 64-byte aligned, contents undefined.
class Keep {
 public:
  void* get(size_t bytes) {
    if (bytes > cap_) {
      std::free(p_);
      cap_ = (bytes + 4095) / 4096 * 4096;
      p_ = std::aligned_alloc(64, cap_);
      if (!p_) {
        cap_ = 0;
        throw std::bad_alloc();
      }
    }
    return p_;
  }
  ~Keep() { std::free(p_); }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};
// Larger needs are allocated for the call and freed.
constexpr size_t kKeepMax = size_t(64) << 20;

// At least `bytes` (+ 64 bytes of slack past the end), 64-byte aligned, valid while this object lives
// and until the next use of `keep`: keep's buffer up to kKeepMax, else an allocation of this object's own.
class CallBuffer {
 public:
  CallBuffer(Keep& keep, size_t bytes) {
    const size_t n = (bytes + 63) / 64 * 64 + 64;
    if (n > kKeepMax) {
      own_.reset(std::aligned_alloc(64, n));
      if (!own_) throw std::bad_alloc();
      p_ = own_.get();
    } else {
      p_ = keep.get(n);
    }
  }
  template <class T> T* as() const { return static_cast<T*>(p_); }

 private:
  std::unique_ptr<void, decltype(&std::free)> own_{nullptr, &std::free};
  void* p_ = nullptr;
};

}  // namespace pk::cpu
