// Calls an attention program exported by `attncc compile attention.toml --backend cuda -o attn.cu`
// through its C ABI (attn.h): causal GQA, 8 query heads over 2 KV heads, head dim 64, fp16.
// Runs the forward on random inputs and compares o and lse with a float64 reference on the host.
// No Python, torch or Triton is involved. Exit status 0 when every element is within tolerance.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attn.h"

namespace {

constexpr int kBatch = 2, kHeads = 8, kKvHeads = 2, kQueries = 100, kKeys = 130, kDim = 64;

#define CHECK(call)                                                                       \
    do {                                                                                  \
        const cudaError_t status_ = static_cast<cudaError_t>(call);                       \
        if (status_ != cudaSuccess) {                                                     \
            std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(status_)); \
            return 1;                                                                     \
        }                                                                                 \
    } while (0)

// Strides (in elements) of a contiguous [B, H, L, D] tensor.
void contiguous_strides(int64_t strides[4], int heads, int length, int dim) {
    strides[3] = 1;
    strides[2] = dim;
    strides[1] = static_cast<int64_t>(length) * dim;
    strides[0] = static_cast<int64_t>(heads) * length * dim;
}

}  // namespace

int main() {
    const size_t q_size = size_t(kBatch) * kHeads * kQueries * kDim, kv_size = size_t(kBatch) * kKvHeads * kKeys * kDim;
    std::vector<__half> q(q_size), k(kv_size), v(kv_size), o(q_size);
    std::vector<float> lse(size_t(kBatch) * kHeads * kQueries);
    std::mt19937 generator(0);
    std::normal_distribution<float> normal;
    for (auto* tensor : {&q, &k, &v})
        for (auto& x : *tensor) x = __float2half(normal(generator));

    __half *q_d, *k_d, *v_d, *o_d;
    float* lse_d;
    CHECK(cudaMalloc(&q_d, q_size * sizeof(__half)));
    CHECK(cudaMalloc(&k_d, kv_size * sizeof(__half)));
    CHECK(cudaMalloc(&v_d, kv_size * sizeof(__half)));
    CHECK(cudaMalloc(&o_d, q_size * sizeof(__half)));
    CHECK(cudaMalloc(&lse_d, lse.size() * sizeof(float)));
    CHECK(cudaMemcpy(q_d, q.data(), q_size * sizeof(__half), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(k_d, k.data(), kv_size * sizeof(__half), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(v_d, v.data(), kv_size * sizeof(__half), cudaMemcpyHostToDevice));

    int64_t q_strides[4], kv_strides[4];
    contiguous_strides(q_strides, kHeads, kQueries, kDim);
    contiguous_strides(kv_strides, kKvHeads, kKeys, kDim);
    cudaStream_t stream;
    CHECK(cudaStreamCreate(&stream));
    CHECK(attncc_attention_forward(ATTNCC_F16, q_d, q_strides, k_d, kv_strides, v_d, kv_strides, o_d, q_strides,
                                   lse_d, kBatch, kHeads, kQueries, kKeys, stream));
    CHECK(cudaStreamSynchronize(stream));
    CHECK(cudaMemcpy(o.data(), o_d, q_size * sizeof(__half), cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(lse.data(), lse_d, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));

    // Reference: query i sees keys j <= i + M - N (causal, bottom-right), KV head h / (H / Hkv).
    double worst = 0.0;
    int failures = 0;
    for (int b = 0; b < kBatch; ++b) {
        for (int h = 0; h < kHeads; ++h) {
            const int kv_h = h / (kHeads / kKvHeads);
            for (int i = 0; i < kQueries; ++i) {
                const __half* q_row = &q[((size_t(b) * kHeads + h) * kQueries + i) * kDim];
                std::vector<double> scores;
                double max_score = -INFINITY;
                for (int j = 0; j <= i + kKeys - kQueries && j < kKeys; ++j) {
                    const __half* k_row = &k[((size_t(b) * kKvHeads + kv_h) * kKeys + j) * kDim];
                    double dot = 0.0;
                    for (int d = 0; d < kDim; ++d) dot += double(__half2float(q_row[d])) * __half2float(k_row[d]);
                    scores.push_back(dot / std::sqrt(double(kDim)));
                    max_score = std::fmax(max_score, scores.back());
                }
                double sum = 0.0;
                for (double s : scores) sum += std::exp(s - max_score);
                const double expected_lse = max_score + std::log(sum);
                const float got_lse = lse[(size_t(b) * kHeads + h) * kQueries + i];
                if (std::fabs(got_lse - expected_lse) > 1e-4 * (1 + std::fabs(expected_lse))) ++failures;
                for (int d = 0; d < kDim; ++d) {
                    double expected = 0.0;
                    for (size_t j = 0; j < scores.size(); ++j) {
                        const __half* v_row = &v[((size_t(b) * kKvHeads + kv_h) * kKeys + j) * kDim];
                        expected += std::exp(scores[j] - max_score) / sum * __half2float(v_row[d]);
                    }
                    const double got = __half2float(o[((size_t(b) * kHeads + h) * kQueries + i) * kDim + d]);
                    const double error = std::fabs(got - expected);
                    worst = std::fmax(worst, error);
                    if (error > 1e-3 + 5e-4 * std::fabs(expected)) ++failures;
                }
            }
        }
    }
    std::printf("o: largest error %.2e against the float64 reference; %d elements out of tolerance\n", worst,
                failures);
    cudaFree(q_d);
    cudaFree(k_d);
    cudaFree(v_d);
    cudaFree(o_d);
    cudaFree(lse_d);
    cudaStreamDestroy(stream);
    return failures == 0 ? 0 : 1;
}
