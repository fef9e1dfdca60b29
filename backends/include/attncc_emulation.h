// attncc's host emulation of the CUDA features its generated kernels use.
//
// The generated source includes this header instead of its device prelude when compiled
// with -DATTNCC_EMULATION by a host C++20 compiler. Everything the kernels do besides the
// functions below is the same C++ on both sides. Here:
//
// - a launch runs the blocks of the grid one after another; the threads of a block are
//   host threads (std::thread) that meet at a real barrier (std::barrier) for
//   __syncthreads, and the 32 threads of a warp at a warp barrier for __syncwarp;
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

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
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

struct Block {
    std::vector<unsigned char> shared;
    std::barrier<> barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
    std::vector<uint32_t> exchange;  // EXCHANGE_WORDS per thread

    Block(unsigned threads, size_t shared_bytes)
        : shared(shared_bytes, 0xFF), barrier(threads), exchange(threads * EXCHANGE_WORDS) {
        for (unsigned w = 0; w < threads / WARP; ++w) warp_barriers.emplace_back(new std::barrier<>(WARP));
    }
};

thread_local Block* block = nullptr;

inline void warp_barrier() { block->warp_barriers[threadIdx.x / WARP]->arrive_and_wait(); }

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
    for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
                const unsigned count = threads.x * threads.y * threads.z;
                Block state(count, shared_bytes);
                std::vector<std::thread> workers;
                workers.reserve(count);
                for (unsigned t = 0; t < count; ++t) {
                    workers.emplace_back([&, t] {
                        block = &state;
                        threadIdx = dim3(t % threads.x, t / threads.x % threads.y, t / (threads.x * threads.y));
                        blockIdx = dim3(x, y, z);
                        blockDim = threads;
                        gridDim = grid;
                        kernel(static_cast<Params>(args)...);
                    });
                }
                for (auto& worker : workers) worker.join();
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

inline void __syncthreads() { attncc_emulation::block->barrier.arrive_and_wait(); }

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
