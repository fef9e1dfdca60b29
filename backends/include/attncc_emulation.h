// attncc's host emulation of the CUDA features its generated kernels use.
//
// The generated source includes this header instead of its device prelude when compiled
// with -DATTNCC_EMULATION by a host C++20 compiler. Everything the kernels do besides the
// functions below is the same C++ on both sides. Here:
//
// - a launch runs the blocks of the grid one after another; the threads of a block are
//   fibers (ucontext), each with its own stack and registers, that run until they reach a
//   barrier: __syncthreads waits for every thread of the block, __syncwarp (and each warp
//   collective) for the 32 threads of the warp. A scheduler resumes the threads whose barrier
//   has opened, alternating ascending and descending thread order from round to round;
// - each block gets its own dynamic shared memory, filled with 0xFF bytes (a NaN in every
//   float format) so that a read of an element no thread wrote shows in the results;
// - warp shuffles and mma.sync.m16n8k16 exchange the lanes' registers through a per-warp
//   buffer between two warp barriers; the MMA rebuilds the 16x16 A, 16x8 B and 16x8 C
//   matrices from the fragment layouts of the PTX ISA ("Matrix Fragments for
//   mma.m16n8k16", f16 and bf16 inputs, f32 accumulators), multiplies the exactly
//   converted inputs in float32 and hands each lane the elements its layout gives it;
// - cp.async copies synchronously (commit and wait are no-ops), so the emulation checks
//   the kernels' indexing and synchronisation by barriers, not the ordering of cp.async;
// - __half and __nv_bfloat16 are 16-bit storage types converted with round-to-nearest-even.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <functional>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace attncc_emulation {

constexpr int WARP = 32;
constexpr int EXCHANGE_WORDS = 8;  // 32-bit words a lane may publish at once (an MMA's A and B fragments)
constexpr size_t STACK_BYTES = 256 * 1024;

// One CUDA thread: a fiber with its own stack, run by its block's scheduler until it waits at a barrier.
struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    dim3 thread;
    bool done = false;
    const unsigned long* waits_on = nullptr;  // a barrier's generation, while waiting for it to change
    unsigned long waited = 0;
};

struct Barrier {
    unsigned arrived = 0;
    unsigned long generation = 0;
};

struct Block {
    std::vector<unsigned char> shared;
    std::vector<uint32_t> exchange;  // EXCHANGE_WORDS per thread
    std::vector<Fiber> fibers;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    ucontext_t scheduler;
    size_t current = 0;
    std::function<void()> body;
};

thread_local Block* block = nullptr;

inline void fiber_entry() {
    block->body();
    block->fibers[block->current].done = true;  // returns to the scheduler (uc_link)
}

// Runs every thread of the block until all return. Each round visits the runnable fibers in
// alternating order (ascending, then descending), so that a missing barrier between a write by one
// warp and a read by another shows whichever warp comes first.
inline void run_block(Block& state, unsigned count, dim3 threads) {
    state.fibers.resize(count);
    for (unsigned t = 0; t < count; ++t) {
        Fiber& fiber = state.fibers[t];
        fiber.stack.reset(new char[STACK_BYTES]);
        fiber.thread = dim3(t % threads.x, t / threads.x % threads.y, t / (threads.x * threads.y));
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = fiber.stack.get();
        fiber.context.uc_stack.ss_size = STACK_BYTES;
        fiber.context.uc_link = &state.scheduler;
        makecontext(&fiber.context, fiber_entry, 0);
    }
    unsigned finished = 0;
    for (unsigned round = 0; finished < count; ++round) {
        for (unsigned i = 0; i < count; ++i) {
            const size_t t = round % 2 == 0 ? i : count - 1 - i;
            Fiber& fiber = state.fibers[t];
            if (fiber.done || (fiber.waits_on != nullptr && *fiber.waits_on == fiber.waited)) continue;
            fiber.waits_on = nullptr;
            state.current = t;
            threadIdx = fiber.thread;
            swapcontext(&state.scheduler, &fiber.context);
            if (fiber.done) ++finished;
        }
    }
}

// Wait until `participants` threads have arrived (the last to arrive releases the others).
inline void arrive_and_wait(Barrier& barrier, unsigned participants) {
    const unsigned long generation = barrier.generation;
    if (++barrier.arrived == participants) {
        barrier.arrived = 0;
        ++barrier.generation;
        return;
    }
    Fiber& fiber = block->fibers[block->current];
    fiber.waits_on = &barrier.generation;
    fiber.waited = generation;
    swapcontext(&fiber.context, &block->scheduler);
}

inline void warp_barrier() { arrive_and_wait(block->warp_barriers[threadIdx.x / WARP], WARP); }

inline uint32_t* lane_words(unsigned thread) { return block->exchange.data() + thread * EXCHANGE_WORDS; }

inline unsigned lane_thread(int lane) { return threadIdx.x / WARP * WARP + lane; }

inline uint16_t float_to_half_bits(float value) {
    uint32_t x;
    std::memcpy(&x, &value, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t magnitude = x & 0x7FFFFFFFu;
    if (magnitude >= 0x7F800000u) return sign | 0x7C00u | (magnitude > 0x7F800000u ? 0x200u : 0u);
    if (magnitude >= 0x477FF000u) return sign | 0x7C00u;  // rounds to a value above the largest half
    if (magnitude < 0x38800000u) {  // a half subnormal (or zero): round |value| * 2^24 to an integer
        const float scaled = std::fabs(value) * 16777216.0f;
        return sign | static_cast<uint16_t>(std::nearbyint(scaled));
    }
    const uint32_t rounded = magnitude + 0xFFFu + ((magnitude >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

inline float half_bits_to_float(uint16_t bits) {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t exponent = (bits >> 10) & 0x1Fu;
    const uint32_t mantissa = bits & 0x3FFu;
    float magnitude;
    if (exponent == 0) {
        magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    } else if (exponent == 31) {
        magnitude = mantissa ? NAN : INFINITY;
    } else {
        magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
    }
    uint32_t x;
    std::memcpy(&x, &magnitude, 4);
    x |= sign;
    float result;
    std::memcpy(&result, &x, 4);
    return result;
}

inline uint16_t float_to_bfloat16_bits(float value) {
    uint32_t x;
    std::memcpy(&x, &value, 4);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
    return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

inline float bfloat16_bits_to_float(uint16_t bits) {
    const uint32_t x = static_cast<uint32_t>(bits) << 16;
    float result;
    std::memcpy(&result, &x, 4);
    return result;
}

// One m16n8k16 product of a warp: each lane publishes its fragments, every lane rebuilds A and B
// from the published registers, and computes the four accumulator elements its layout gives it.
template <typename Convert>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], Convert to_float) {
    uint32_t* mine = lane_words(threadIdx.x);
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
    warp_barrier();
    float A[16][16], B[16][8];
    for (int lane = 0; lane < WARP; ++lane) {
        const uint32_t* words = lane_words(lane_thread(lane));
        const int group = lane / 4, quad = lane % 4;
        for (int i = 0; i < 8; ++i) {  // a_i: row group (+8 for i % 4 >= 2), column 2 quad + i % 2 (+8 for i >= 4)
            const uint16_t bits = static_cast<uint16_t>(words[i / 2] >> (16 * (i % 2)));
            A[group + 8 * ((i / 2) % 2)][2 * quad + i % 2 + 8 * (i / 4)] = to_float(bits);
        }
        for (int i = 0; i < 4; ++i) {  // b_i: row 2 quad + i % 2 (+8 for i >= 2), column group
            const uint16_t bits = static_cast<uint16_t>(words[4 + i / 2] >> (16 * (i % 2)));
            B[2 * quad + i % 2 + 8 * (i / 2)][group] = to_float(bits);
        }
    }
    warp_barrier();
    const int lane = threadIdx.x % WARP, group = lane / 4, quad = lane % 4;
    for (int i = 0; i < 4; ++i) {  // c_i: row group (+8 for i >= 2), column 2 quad + i % 2
        const int row = group + 8 * (i / 2), column = 2 * quad + i % 2;
        float sum = c[i];
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][column];
        c[i] = sum;
    }
}

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 threads, size_t shared_bytes, cudaStream_t, Args... args) {
    const unsigned count = threads.x * threads.y * threads.z;
    if (count % WARP != 0) return cudaErrorInvalidValue;
    for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
                Block state;
                state.shared.assign(shared_bytes, 0xFF);
                state.exchange.assign(count * EXCHANGE_WORDS, 0);
                state.warp_barriers.resize(count / WARP);
                state.body = [&] { kernel(static_cast<Params>(args)...); };
                block = &state;
                blockIdx = dim3(x, y, z);
                blockDim = threads;
                gridDim = grid;
                run_block(state, count, threads);
                block = nullptr;
            }
        }
    }
    return cudaSuccess;
}

}  // namespace attncc_emulation

struct __half {
    uint16_t bits;
};

struct __nv_bfloat16 {
    uint16_t bits;
};

inline void __syncthreads() {
    using namespace attncc_emulation;
    arrive_and_wait(block->block_barrier, static_cast<unsigned>(block->fibers.size()));
}

inline void __syncwarp(unsigned = 0xFFFFFFFFu) { attncc_emulation::warp_barrier(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    using namespace attncc_emulation;
    std::memcpy(lane_words(threadIdx.x), &value, 4);
    warp_barrier();
    float other;
    std::memcpy(&other, lane_words(lane_thread(static_cast<int>(threadIdx.x % WARP) ^ lane_mask)), 4);
    warp_barrier();
    return other;
}

// -- the device prelude's functions, on the host

inline unsigned char* shared_memory() { return attncc_emulation::block->shared.data(); }

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return attncc_emulation::half_bits_to_float(x.bits); }
inline float to_float(__nv_bfloat16 x) { return attncc_emulation::bfloat16_bits_to_float(x.bits); }

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
    return x;
}
template <>
inline __half from_float<__half>(float x) {
    return __half{attncc_emulation::float_to_half_bits(x)};
}
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __nv_bfloat16{attncc_emulation::float_to_bfloat16_bits(x)};
}

inline uint32_t bits_of(__half x) { return x.bits; }
inline uint32_t bits_of(__nv_bfloat16 x) { return x.bits; }

inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
    attncc_emulation::mma_m16n8k16(c, a, b, attncc_emulation::half_bits_to_float);
}

inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __nv_bfloat16) {
    attncc_emulation::mma_m16n8k16(c, a, b, attncc_emulation::bfloat16_bits_to_float);
}

inline void cp_async_16(void* shared, const void* global) { std::memcpy(shared, global, 16); }
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}
inline void cp_async_wait_one() {}

using attncc_emulation::launch;
