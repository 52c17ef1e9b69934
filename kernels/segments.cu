// The segment kernel of the GPU path (wrapper: segments.py, cupy_backend.py). The NumPy backend
// defines the bytes; this kernel must write exactly those bytes.
//
// One launch runs a table of segments, each over its own range of the grid's blocks, striding over
// its work. A segment is four u64: src, dst, m, and k | mode << 8 | first block << 16:
//   mode 0, copy: m bytes;
//   mode 1, shuffle: m elements of k bytes into k planes of m bytes (dst[p * m + i] = src[i * k + p]);
//   mode 2, unshuffle: the inverse.
//
// Fast path (16-byte aligned pointers, m a multiple of 16, k 2, 4 or 8): the unit of work is a group of
// 16 elements, one per thread, and a warp takes a tile of 32 consecutive groups (512 elements). The
// element side of a tile is 32 * k contiguous 16-byte vectors; the plane side is k runs of 32 vectors.
// Both sides are moved by the warp in 16-byte accesses, consecutive lanes on consecutive vectors
// (coalesced), the element side through shared memory: each lane's own 16 elements are k vectors
// lying 16 * k bytes apart from the next lane's, which read straight from memory would spread every
// warp access over k times the bytes it uses. In registers a lane turns its 16 elements into 16 bytes
// of each plane, or back. A tile the segment ends inside goes lane by lane, straight from memory.
// Anything else (a tail chunk of an odd-sized tensor, 16-byte elements) takes a byte loop.

typedef unsigned long long u64;

#ifndef SNAPD_THREADS                // threads per block: the wrapper passes the number it launches
#define SNAPD_THREADS 256
#endif
#define SNAPD_WARPS (SNAPD_THREADS / 32)
#define SNAPD_TILE_SLOTS 256         // 16-byte vectors in one warp's tile at k = 8: 32 lanes * 8

// Shared-memory slot of vector u of a warp's tile. A warp's 16-byte accesses are served 8 lanes at a
// time, without conflict when those 8 lanes hit 8 distinct slots mod 8. Row-wise access (lane l on
// vector 32 j + l) and lane-wise access (lane l on vector k l + j) both get that from xor-ing the low
// three bits with bits 3-5 (worked through for k = 2, 4, 8 in kernels/NOTES.md).
__device__ __forceinline__ unsigned slot(unsigned u) { return u ^ ((u >> 3) & 7u); }

// w: 16 elements of K bytes (4 K words, element-major). o: byte p of each of the 16, four words.
// One plane (or, below, one vector of elements) at a time keeps 4 words live beside w, not 4 K.
template <int K> __device__ __forceinline__ void plane_words(const unsigned* w, int p, unsigned* o) {
#pragma unroll
    for (int q = 0; q < 4; q++) {
        unsigned word = 0;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int b = (4 * q + r) * K + p;   // byte p of element 4q+r
            word |= ((w[b >> 2] >> (8 * (b & 3))) & 0xffu) << (8 * r);
        }
        o[q] = word;
    }
}

// The inverse: w[4 p + q] holds byte p of elements 4q .. 4q + 3; o gets words 4 j .. 4 j + 3 of the
// 16 elements, element-major.
template <int K> __device__ __forceinline__ void element_words(const unsigned* w, int j, unsigned* o) {
#pragma unroll
    for (int q = 0; q < 4; q++) {
        unsigned word = 0;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int b = (4 * j + q) * 4 + r;       // output byte b: element b / K, byte b % K
            const int e = b / K, p = b % K;
            word |= ((w[4 * p + (e >> 2)] >> (8 * (e & 3))) & 0xffu) << (8 * r);
        }
        o[q] = word;
    }
}

__device__ __forceinline__ void unpack(uint4 v, unsigned* w) { w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w; }
__device__ __forceinline__ uint4 pack4(const unsigned* w) { return make_uint4(w[0], w[1], w[2], w[3]); }

// Group g (elements 16 g .. 16 g + 15) of a shuffle, straight from memory.
template <int K> __device__ __forceinline__ void shuffle_group(const unsigned char* src, unsigned char* dst, u64 m,
                                                               u64 g) {
    unsigned w[4 * K], o[4];
    const uint4* s = (const uint4*)(src + g * 16 * K);
#pragma unroll
    for (int j = 0; j < K; j++) unpack(s[j], w + 4 * j);
#pragma unroll
    for (int p = 0; p < K; p++) { plane_words<K>(w, p, o); *(uint4*)(dst + p * m + g * 16) = pack4(o); }
}

template <int K> __device__ __forceinline__ void unshuffle_group(const unsigned char* src, unsigned char* dst, u64 m,
                                                                 u64 g) {
    unsigned w[4 * K], o[4];
#pragma unroll
    for (int p = 0; p < K; p++) unpack(*(const uint4*)(src + p * m + g * 16), w + 4 * p);
    uint4* d = (uint4*)(dst + g * 16 * K);
#pragma unroll
    for (int j = 0; j < K; j++) { element_words<K>(w, j, o); d[j] = pack4(o); }
}

// Tile t (groups 32 t .. 32 t + 31) of a shuffle, by the whole warp; sm: the warp's shared slots.
template <int K> __device__ __forceinline__ void shuffle_tile(const unsigned char* src, unsigned char* dst, u64 m,
                                                              u64 t, uint4* sm, unsigned lane) {
    const uint4* s = (const uint4*)(src + t * 512 * K);
    uint4 v[K];
#pragma unroll
    for (int j = 0; j < K; j++) v[j] = s[32 * j + lane];   // all loads in flight before the first store
#pragma unroll
    for (int j = 0; j < K; j++) sm[slot(32 * j + lane)] = v[j];
    __syncwarp();
    unsigned w[4 * K], o[4];
#pragma unroll
    for (int j = 0; j < K; j++) unpack(sm[slot(K * lane + j)], w + 4 * j);
    __syncwarp();   // the slots are free for the next tile
    const u64 e0 = (t * 32 + lane) * 16;
#pragma unroll
    for (int p = 0; p < K; p++) { plane_words<K>(w, p, o); *(uint4*)(dst + p * m + e0) = pack4(o); }
}

template <int K> __device__ __forceinline__ void unshuffle_tile(const unsigned char* src, unsigned char* dst, u64 m,
                                                                u64 t, uint4* sm, unsigned lane) {
    const u64 e0 = (t * 32 + lane) * 16;
    unsigned w[4 * K], o[4];
#pragma unroll
    for (int p = 0; p < K; p++) unpack(*(const uint4*)(src + p * m + e0), w + 4 * p);
#pragma unroll
    for (int j = 0; j < K; j++) { element_words<K>(w, j, o); sm[slot(K * lane + j)] = pack4(o); }
    __syncwarp();
    uint4* d = (uint4*)(dst + t * 512 * K);
#pragma unroll
    for (int j = 0; j < K; j++) d[32 * j + lane] = sm[slot(32 * j + lane)];
    __syncwarp();
}

template <int K> __device__ __forceinline__ void planes_fast(const unsigned char* src, unsigned char* dst, u64 m,
                                                             int mode, uint4* sm, u64 first, u64 stride) {
    const unsigned lane = threadIdx.x & 31u;
    const u64 groups = m / 16, tiles = (groups + 31) / 32;
    // t is the same for the whole warp, so every lane reaches the same __syncwarp calls
    for (u64 t = first / 32; t < tiles; t += stride / 32) {
        if ((t + 1) * 32 <= groups) {
            if (mode == 1) shuffle_tile<K>(src, dst, m, t, sm, lane);
            else unshuffle_tile<K>(src, dst, m, t, sm, lane);
        } else if (t * 32 + lane < groups) {
            if (mode == 1) shuffle_group<K>(src, dst, m, t * 32 + lane);
            else unshuffle_group<K>(src, dst, m, t * 32 + lane);
        }
    }
}

// 4 blocks a multiprocessor (64 registers, no spills; 72 uncapped, the k = 8 path): half occupancy, as
// the kernel before the tiles had, and 32 KB of shared memory a block.
extern "C" __global__ void __launch_bounds__(SNAPD_THREADS, 4) snapd_segments(const u64* __restrict__ segs,
                                                                              unsigned nsegs) {
    __shared__ uint4 smem[SNAPD_WARPS * SNAPD_TILE_SLOTS];
    // Segment i owns blocks [start_i, start_(i+1)) of a one-dimensional grid, start_i in bits 16-63 of
    // its fourth word, as many as its work fills (segments.py): this block's segment is the last that
    // starts at or before it. (A grid of segments x the largest segment's blocks left most blocks idle
    // when a window held one large tensor beside many small ones.) The search's reads are the same
    // for the whole block and the table's first levels stay in L1.
    unsigned lo = 0, hi = nsegs - 1;
    while (lo < hi) {
        const unsigned mid = (lo + hi + 1) / 2;
        if ((segs[4ULL * mid + 3] >> 16) <= blockIdx.x) lo = mid;
        else hi = mid - 1;
    }
    const u64* s = segs + 4ULL * lo;
    const unsigned char* src = (const unsigned char*)s[0];
    unsigned char* dst = (unsigned char*)s[1];
    const u64 m = s[2];
    const int k = (int)(s[3] & 0xffULL), mode = (int)((s[3] >> 8) & 0xffULL);
    const u64 start = s[3] >> 16, end = lo + 1 < nsegs ? segs[4ULL * lo + 7] >> 16 : (u64)gridDim.x;
    const u64 stride = (u64)blockDim.x * (end - start);
    const u64 first = ((u64)blockIdx.x - start) * blockDim.x + threadIdx.x;
    const bool aligned = (((u64)src | (u64)dst) & 15ULL) == 0;
    if (mode == 0) {
        if (aligned && (m & 15ULL) == 0) {
            for (u64 j = first; j < m / 16; j += stride) ((uint4*)dst)[j] = ((const uint4*)src)[j];
        } else {
            for (u64 j = first; j < m; j += stride) dst[j] = src[j];
        }
        return;
    }
    if (aligned && (m & 15ULL) == 0 && (k == 2 || k == 4 || k == 8)) {
        uint4* sm = smem + (threadIdx.x / 32) * SNAPD_TILE_SLOTS;
        if (k == 2) planes_fast<2>(src, dst, m, mode, sm, first, stride);
        else if (k == 4) planes_fast<4>(src, dst, m, mode, sm, first, stride);
        else planes_fast<8>(src, dst, m, mode, sm, first, stride);
        return;
    }
    const u64 total = m * (u64)k;
    for (u64 j = first; j < total; j += stride) {
        if (mode == 1) { const u64 p = j / m, i = j - p * m; dst[j] = src[i * k + p]; }
        else { const u64 i = j / k, p = j - i * k; dst[j] = src[p * m + i]; }
    }
}
