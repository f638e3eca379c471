// CPU decode, NEON tier (aarch64): see cpu.h. Empty on other architectures.
#include "cpu/cpu.h"

#if defined(__aarch64__)
#include <arm_neon.h>

namespace pk::cpu {}  // namespace pk::cpu
#endif  // __aarch64__
