// Runs one launch of snapd_segments on the CPU: snapd_emulate(table, segments, blocks, block_x).
// Warps run one after another; a warp's lanes are ucontext coroutines, switched at __syncwarp (see
// cuda_shim.h). Returns 0, or -1 when some lane reached a __syncwarp that another lane of its warp
// never reached (returned from the kernel instead): a hang or a race on a GPU.
#include <ucontext.h>

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

void lane_main() {
    snapd_segments(launch_table, launch_segments);
    lanes[current].state = RETURNED;
}  // returning resumes uc_link: the scheduler
}  // namespace

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
    return status;
}
