// Just enough of CUDA C++ to compile kernels/segments.cu with g++ and run it on the CPU (tests only).
// The lanes of a warp are coroutines on one host thread (emulate.cpp): a lane runs until it calls
// __syncwarp or returns, then the next lane runs. So a lane that reads what another lane writes
// without a __syncwarp between reads it unwritten, and the test sees wrong bytes. __shared__ memory
// is one static array, right because blocks run one after another.
//
// A GPU faults on a 16-byte access that is misaligned or outside the memory it was given, where x86
// reads and writes it without complaint. So every uint4 load and store reports its address to the
// emulator (snapd_vector_access), which checks it against the launch's segments; a faulting access
// is skipped (a load reads zeros), so that the test reports it instead of the heap breaking.
#pragma once

bool snapd_vector_access(const void* at, bool store);   // emulate.cpp: false (and the first recorded) on a fault

struct alignas(16) uint4 {
    unsigned x, y, z, w;
    uint4() = default;
    uint4(unsigned a, unsigned b, unsigned c, unsigned d) : x(a), y(b), z(c), w(d) {}
    uint4(const uint4& o) : x(0), y(0), z(0), w(0) { if (snapd_vector_access(&o, false)) assign(o); }
    uint4& operator=(const uint4& o) {
        const bool load = snapd_vector_access(&o, false);
        if (snapd_vector_access(this, true)) {
            if (load) assign(o);
            else x = y = z = w = 0;
        }
        return *this;
    }
    void assign(const uint4& o) { x = o.x; y = o.y; z = o.z; w = o.w; }   // (by field: no aligned SSE move to trap)
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4(x, y, z, w); }
struct snapd_dim3 { unsigned x, y, z; };

extern snapd_dim3 threadIdx, blockIdx, blockDim, gridDim;   // set by the emulator before a lane resumes
void snapd_syncwarp();                                        // yields to the emulator

inline void __syncwarp(unsigned = 0xffffffffu) { snapd_syncwarp(); }

#define __device__
#define __global__
#define __forceinline__ inline
// (a section of its own, so that the emulator knows a shared-memory address when it sees one)
#define __shared__ static __attribute__((section("snapd_shared")))
#define __launch_bounds__(...)
