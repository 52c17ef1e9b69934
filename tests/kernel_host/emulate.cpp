// Runs one launch of snapd_segments on the CPU: snapd_emulate(table, segments, blocks, block_x).
// Warps run one after another; a warp's lanes are ucontext coroutines, switched at __syncwarp (see
// cuda_shim.h). Returns 0, or -1 when some lane reached a __syncwarp that another lane of its warp
// never reached (returned from the kernel instead): a hang or a race on a GPU; or -2 when a 16-byte
// access was one a GPU faults on (snapd_fault says which): misaligned, or outside the memory of the
// launch: a load outside every segment's source, a store outside every destination (the lane's own
// stack and the shared array aside). Byte accesses are not seen; the tests' guard bytes catch the
// stray stores among them.
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "cuda_shim.h"
#include "segments.cu"

snapd_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {
enum State { RUNNING, AT_BARRIER, RETURNED };
struct Lane {
    ucontext_t ctx;
    std::vector<char> stack = std::vector<char>(256 << 10);
    State state = RUNNING;
};
ucontext_t scheduler;
Lane lanes[32];
int current = -1;
const u64* launch_table = nullptr;
unsigned launch_segments = 0;

using Ranges = std::vector<std::pair<uintptr_t, uintptr_t>>;   // [start, end), sorted, disjoint
Ranges sources, destinations;
char fault[256];   // the first bad access of the launch ("" while there is none)

Ranges merged(Ranges r) {
    std::sort(r.begin(), r.end());
    Ranges out;
    for (const auto& x : r) {
        if (x.first == x.second) continue;
        if (!out.empty() && x.first <= out.back().second) out.back().second = std::max(out.back().second, x.second);
        else out.push_back(x);
    }
    return out;
}

bool inside(const Ranges& r, uintptr_t a, uintptr_t n) {
    auto it = std::upper_bound(r.begin(), r.end(), std::make_pair(a, UINTPTR_MAX));
    return it != r.begin() && a + n <= (--it)->second;
}

void lane_main() {
    snapd_segments(launch_table, launch_segments);
    lanes[current].state = RETURNED;
}  // returning resumes uc_link: the scheduler
}  // namespace

extern char __start_snapd_shared[], __stop_snapd_shared[];   // the linker's bounds of cuda_shim.h's section

bool snapd_vector_access(const void* at, bool store) {
    const uintptr_t a = (uintptr_t)at;
    const char* what = nullptr;
    const Lane& me = lanes[current];
    if (a % 16) what = "misaligned";
    else if (a >= (uintptr_t)me.stack.data() && a + 16 <= (uintptr_t)me.stack.data() + me.stack.size()) return true;
    else if (a >= (uintptr_t)__start_snapd_shared && a + 16 <= (uintptr_t)__stop_snapd_shared) return true;
    else if (!inside(store ? destinations : sources, a, 16)) what = store ? "outside every destination" : "outside every source";
    if (what && !fault[0])
        snprintf(fault, sizeof fault, "16-byte %s at %#lx %s (block %u, thread %u)", store ? "store" : "load",
                 (unsigned long)a, what, blockIdx.x, threadIdx.x);
    return what == nullptr;
}

extern "C" const char* snapd_fault() { return fault; }

void snapd_syncwarp() {
    Lane& me = lanes[current];
    me.state = AT_BARRIER;
    swapcontext(&me.ctx, &scheduler);
}

extern "C" int snapd_emulate(const u64* table, unsigned segments, unsigned blocks, unsigned block_x) {
    gridDim = {blocks, 1, 1};
    blockDim = {block_x, 1, 1};
    launch_table = table;
    launch_segments = segments;
    Ranges src, dst;
    for (unsigned i = 0; i < segments; i++) {
        const u64* g = table + 4 * i;
        const u64 k = g[3] & 0xff, mode = (g[3] >> 8) & 0xff, n = mode == 0 ? g[2] : g[2] * k;
        src.emplace_back(g[0], g[0] + n);
        dst.emplace_back(g[1], g[1] + n);
    }
    sources = merged(src);
    destinations = merged(dst);
    fault[0] = 0;
    int status = 0;
    for (unsigned x = 0; x < blocks; x++)
        for (unsigned w0 = 0; w0 < block_x; w0 += 32) {
            const int n = block_x - w0 < 32 ? (int)(block_x - w0) : 32;
            for (int l = 0; l < n; l++) {
                getcontext(&lanes[l].ctx);
                lanes[l].ctx.uc_stack.ss_sp = lanes[l].stack.data();
                lanes[l].ctx.uc_stack.ss_size = lanes[l].stack.size();
                lanes[l].ctx.uc_link = &scheduler;
                makecontext(&lanes[l].ctx, lane_main, 0);
                lanes[l].state = RUNNING;
            }
            for (;;) {  // one round: every lane runs to its next __syncwarp or to its return
                int waiting = 0, returned = 0;
                for (int l = 0; l < n; l++) {
                    if (lanes[l].state == RETURNED) { returned++; continue; }
                    lanes[l].state = RUNNING;
                    current = l;
                    blockIdx = {x, 0, 0};
                    threadIdx = {w0 + l, 0, 0};
                    swapcontext(&scheduler, &lanes[l].ctx);
                    if (lanes[l].state == AT_BARRIER) waiting++;
                    else returned++;
                }
                if (waiting == 0) break;
                if (returned) status = -1;   // released anyway, so the launch still ends
            }
        }
    return fault[0] ? -2 : status;
}
