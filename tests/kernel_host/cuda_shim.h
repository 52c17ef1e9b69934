// Just enough of CUDA C++ to compile kernels/segments.cu with g++ and run it on the CPU (tests only).
// The lanes of a warp are coroutines on one host thread (emulate.cpp): a lane runs until it calls
// __syncwarp or returns, then the next lane runs. So a lane that reads what another lane writes
// without a __syncwarp between reads it unwritten, and the test sees wrong bytes. __shared__ memory
// is one static array, right because blocks run one after another.
#pragma once

struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct snapd_dim3 { unsigned x, y, z; };

extern snapd_dim3 threadIdx, blockIdx, blockDim, gridDim;   // set by the emulator before a lane resumes
void snapd_syncwarp();                                        // yields to the emulator

inline void __syncwarp(unsigned = 0xffffffffu) { snapd_syncwarp(); }

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
