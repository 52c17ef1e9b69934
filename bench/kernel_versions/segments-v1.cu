// The segment kernel as it was before the warp tiles (commit 5473050), kept to time against the
// committed one in the same run: python -m bench.gpu_bench --compare-kernel bench/kernel_versions/segments-v1.cu
// Measured on H100s (bench/results/gpu.md): shuffle 0.51-0.67 of a device copy, unshuffle 0.34-0.67.
typedef unsigned long long u64;

template <int K> __device__ __forceinline__ void shuffle16(const unsigned char* src, unsigned char* dst, u64 m, u64 e0) {
    unsigned int w[4 * K];
    const uint4* s = (const uint4*)(src + e0 * K);
#pragma unroll
    for (int j = 0; j < K; j++) { uint4 v = s[j]; w[4*j] = v.x; w[4*j+1] = v.y; w[4*j+2] = v.z; w[4*j+3] = v.w; }
#pragma unroll
    for (int p = 0; p < K; p++) {
        unsigned int o[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            unsigned int word = 0;
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int b = (4 * q + r) * K + p;   // byte p of element 4q+r
                word |= ((w[b >> 2] >> (8 * (b & 3))) & 0xffu) << (8 * r);
            }
            o[q] = word;
        }
        *(uint4*)(dst + p * m + e0) = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

template <int K> __device__ __forceinline__ void unshuffle16(const unsigned char* src, unsigned char* dst, u64 m, u64 e0) {
    unsigned int w[4 * K];   // w[4p + q]: plane p, elements 4q..4q+3
#pragma unroll
    for (int p = 0; p < K; p++) {
        uint4 v = *(const uint4*)(src + p * m + e0); w[4*p] = v.x; w[4*p+1] = v.y; w[4*p+2] = v.z; w[4*p+3] = v.w;
    }
    uint4* d = (uint4*)(dst + e0 * K);
#pragma unroll
    for (int j = 0; j < K; j++) {
        unsigned int o[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            unsigned int word = 0;
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int b = (4 * j + q) * 4 + r;   // output byte b: element b / K, byte b % K
                const int e = b / K, p = b % K;
                word |= ((w[4 * p + (e >> 2)] >> (8 * (e & 3))) & 0xffu) << (8 * r);
            }
            o[q] = word;
        }
        d[j] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

extern "C" __global__ void snapd_segments(const u64* __restrict__ segs) {
    const u64* s = segs + 4ULL * blockIdx.y;
    const unsigned char* src = (const unsigned char*)s[0];
    unsigned char* dst = (unsigned char*)s[1];
    const u64 m = s[2];
    const int k = (int)(s[3] & 0xffULL), mode = (int)(s[3] >> 8);
    const u64 stride = (u64)blockDim.x * gridDim.x;
    const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
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
        for (u64 g = first; g < m / 16; g += stride) {
            const u64 e0 = g * 16;
            if (mode == 1) {
                if (k == 2) shuffle16<2>(src, dst, m, e0);
                else if (k == 4) shuffle16<4>(src, dst, m, e0);
                else shuffle16<8>(src, dst, m, e0);
            } else {
                if (k == 2) unshuffle16<2>(src, dst, m, e0);
                else if (k == 4) unshuffle16<4>(src, dst, m, e0);
                else unshuffle16<8>(src, dst, m, e0);
            }
        }
        return;
    }
    const u64 total = m * (u64)k;
    for (u64 j = first; j < total; j += stride) {
        if (mode == 1) { const u64 p = j / m, i = j - p * m; dst[j] = src[i * k + p]; }
        else { const u64 i = j / k, p = j - i * k; dst[j] = src[p * m + i]; }
    }
}
