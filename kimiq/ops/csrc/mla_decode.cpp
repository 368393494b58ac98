// MLA's absorbed decode attention over the latent cache in one pass (kimiq_cpu::mla_decode): flash-decoding on CPU.
//
//   mla_decode(q [B, H, D], past [B, L, D] fp32 or bf16, new [B, D], lengths [B] int64, scale, value_dim)
//       -> o [B, H, value_dim] fp32
//   o[b, h] = softmax_j(scale * q[b, h] . c_j) weighted sum of c_j[:value_dim] over the cached rows j < lengths[b]
//   and the new row (always attended), c_j = past[b, j] or new[b]
//
// KimiMLAAttention.decode's einsums read the cache twice (scores, then values) and on CPU at long context run at a
// fraction of the memory bandwidth; here each cached row is read once from memory: blocks of rows get their scores,
// the running max / sum / output of every head are rescaled once per block (online softmax), and the block's rows
// (still in cache) are accumulated.  Threads split the rows and merge their partial softmax states.  Only the first
// value_dim columns are accumulated (MLA uses the latent's first kv_lora_rank columns as values, not the rope part).
//
// A bf16 cache on a CPU with AVX512-BF16 uses bf16 dot products (vdpbf16ps: 32 products per instruction, twice the
// fp32 FMA rate; the fp32 kernel is bound by arithmetic more than memory): q and the softmax weights are rounded to
// bf16, the accumulation stays fp32.  Without AVX512-BF16 the bf16 rows are widened to fp32 in registers as they are loaded
// (exact).  Tested against the module's einsum path in tests/ops/test_qops.py (tolerance by cache dtype).
//
// 2-core Xeon (Ice Lake, AVX-512 without BF16), 1 thread, 4 heads x 288 columns, 131072 rows, one layer: fp32 cache
// 27.2 -> 17.8-19.8 ms, bf16 27.4 -> 13.1-14.7 ms with the vector exp, two rows scored at a time, prefetching and
// in-register widening (was: libm expf, one row at a time, a widened copy of each block).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;  // rows scored before their values are accumulated (32 x D floats stay in L2)
constexpr int64_t kAhead = 4;   // rows prefetched ahead of the one being scored

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KIMIQ_MLA_AVX512 1
inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// 16 columns of a row as fp32: fp32 loaded, bf16 widened in registers (bf16 is fp32's upper half)
inline __m512 load16(const float *p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
inline __m512 load16(const uint16_t *p, __mmask16 mk) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}

// exp(x) for x <= 0 (scores minus their running max): x = k ln2 + r, |r| <= ln2/2, exp(r) by its Taylor series to
// r^6 (relative error ~2e-7), times 2^k by scalef (0 below 2^-149).  libm's expf, one call a weight, took ~15% of
// the fp32 kernel.
inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: k * hi is exact
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, k);
}
#endif

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return c10::BFloat16(v, c10::BFloat16::from_bits()); }

struct Partial {  // one thread's softmax state for all heads: running max, sum of exp, unnormalised output
    std::vector<float> m, s, acc;  // acc: [H, stride]
};

// The online-softmax update of G heads after a block's n scores (sco[g * kBlock + i], scaled): rescales the
// running sums and the G accumulators (w floats each), turns the scores into weights exp(score - max)
template <int G>
inline void softmax_update(int64_t h0, int64_t n, const float *mb, float *const *acc, int64_t w, Partial &st,
                           float *sco) {
    for (int g = 0; g < G; g++) {
        const float corr = std::exp(st.m[h0 + g] - mb[g]);  // 0 on the first block (m = -inf)
        float sum = st.s[h0 + g] * corr;
        for (int64_t d = 0; d < w; d++) acc[g][d] *= corr;
        float *e = sco + g * kBlock;
#ifdef KIMIQ_MLA_AVX512
        __m512 tot = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 mk = lanes(n - i);
            const __m512 v = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, e + i), _mm512_set1_ps(mb[g])));
            _mm512_mask_storeu_ps(e + i, mk, v);
            tot = _mm512_add_ps(tot, _mm512_maskz_mov_ps(mk, v));
        }
        sum += _mm512_reduce_add_ps(tot);
#else
        for (int64_t i = 0; i < n; i++) {
            e[i] = std::exp(e[i] - mb[g]);
            sum += e[i];
        }
#endif
        st.m[h0 + g] = mb[g];
        st.s[h0 + g] = sum;
    }
}

// G heads (h0..h0+G-1) over one block of n rows (rows: rs elements apart, fp32 or bf16): scores two rows at a time
// (2G independent FMA chains, each q chunk loaded once for both rows), the online softmax update, then the rows'
// first Dv columns accumulated into the G outputs (each row chunk loaded once for the G heads).  Any D: the last
// 16 columns are masked.  The rows kAhead ahead are prefetched (the hardware prefetcher alone left the fp32 kernel
// waiting on memory at half the bandwidth one core reads).
template <int G, typename T>
inline void block(const float *qb, int64_t h0, int64_t D, int64_t Dv, int64_t n, const T *rows, int64_t rs,
                  float sc, Partial &st, float *sco) {
    const float *qh[G];
    float *acc[G];
    for (int g = 0; g < G; g++) qh[g] = qb + (h0 + g) * D, acc[g] = st.acc.data() + (h0 + g) * Dv;
    float mb[G];
    for (int g = 0; g < G; g++) mb[g] = st.m[h0 + g];
#ifdef KIMIQ_MLA_AVX512
    for (int64_t i = 0; i < n; i += 2) {
        const bool two = i + 1 < n;
        const T *c0 = rows + i * rs, *c1 = two ? c0 + rs : c0;
        const char *ahead = reinterpret_cast<const char *>(rows + (i + kAhead) * rs);
        __m512 a0[G], a1[G];
        for (int g = 0; g < G; g++) a0[g] = _mm512_setzero_ps(), a1[g] = _mm512_setzero_ps();
        auto chunk = [&](int64_t d, __mmask16 mk) {
            _mm_prefetch(ahead + d * sizeof(T), _MM_HINT_T0);  // a hint: never faults, even past the cache's end
            _mm_prefetch(ahead + (rs + d) * sizeof(T), _MM_HINT_T0);
            const __m512 x0 = load16(c0 + d, mk), x1 = load16(c1 + d, mk);
            for (int g = 0; g < G; g++) {
                const __m512 qv = _mm512_maskz_loadu_ps(mk, qh[g] + d);
                a0[g] = _mm512_fmadd_ps(qv, x0, a0[g]);
                a1[g] = _mm512_fmadd_ps(qv, x1, a1[g]);
            }
        };
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) chunk(d, 0xFFFF);  // whole chunks, then a masked last one
        if (d < D) chunk(d, lanes(D - d));
        for (int g = 0; g < G; g++) {
            const float s0 = _mm512_reduce_add_ps(a0[g]) * sc;
            sco[g * kBlock + i] = s0;
            mb[g] = std::max(mb[g], s0);
            if (two) {
                const float s1 = _mm512_reduce_add_ps(a1[g]) * sc;
                sco[g * kBlock + i + 1] = s1;
                mb[g] = std::max(mb[g], s1);
            }
        }
    }
    softmax_update<G>(h0, n, mb, acc, Dv, st, sco);
    for (int64_t d = 0; d < Dv; d += 16) {  // the G outputs' 16 columns stay in registers over the block's rows
        const __mmask16 mk = lanes(Dv - d);
        __m512 av[G];
        for (int g = 0; g < G; g++) av[g] = _mm512_maskz_loadu_ps(mk, acc[g] + d);
        for (int64_t i = 0; i < n; i++) {
            const __m512 cv = load16(rows + i * rs + d, mk);
            for (int g = 0; g < G; g++) av[g] = _mm512_fmadd_ps(_mm512_set1_ps(sco[g * kBlock + i]), cv, av[g]);
        }
        for (int g = 0; g < G; g++) _mm512_mask_storeu_ps(acc[g] + d, mk, av[g]);
    }
#else
    for (int64_t i = 0; i < n; i++) {
        const T *c = rows + i * rs;
        for (int g = 0; g < G; g++) {
            float t = 0.f;
            for (int64_t d = 0; d < D; d++) t += qh[g][d] * to_float(c[d]);
            sco[g * kBlock + i] = t * sc;
            mb[g] = std::max(mb[g], t * sc);
        }
    }
    softmax_update<G>(h0, n, mb, acc, Dv, st, sco);
    for (int64_t i = 0; i < n; i++) {
        const T *c = rows + i * rs;
        for (int64_t d = 0; d < Dv; d++)
            for (int g = 0; g < G; g++) acc[g][d] += sco[g * kBlock + i] * to_float(c[d]);
    }
#endif
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define KIMIQ_MLA_BF16_DOTS 1
inline __mmask32 lanes32(int64_t left) {
    return left >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1ull << left) - 1);
}

// Where column j (0..31) of a 32-column chunk sits in the bf16 kernel's accumulators: a row pair is interleaved
// with vpunpck{l,h}wd, which works within 128-bit lanes, so the "lo" register holds columns 0-3, 8-11, 16-19, 24-27
// and the "hi" register (16 floats further) the others.  The merge reads the outputs back through this map.
inline int64_t bf16_slot(int64_t j) {
    const int64_t lane = j / 8, k = j % 8;
    return (k < 4 ? 0 : 16) + lane * 4 + (k % 4);
}

// bf16 rows with bf16 dot products: as block<G>, with q rounded to bf16 (qb [H, Dq], zero-padded to a multiple of
// 32), the weights rounded to bf16 (their sum too, so they still sum to what divides), and each accumulator stored
// in 32-column chunks in bf16_slot order (stride Dvp = Dv rounded up to 32).  Values take two rows at a time:
// vdpbf16ps adds c_i[d] * p_i + c_{i+1}[d] * p_{i+1} into fp32.
template <int G>
inline void block_bf16(const uint16_t *qb, int64_t Dq, int64_t h0, int64_t D, int64_t Dv, int64_t Dvp, int64_t n,
                       const uint16_t *rows, int64_t rs, float sc, Partial &st, float *sco, uint32_t *pair) {
    const uint16_t *qh[G];
    float *acc[G];
    for (int g = 0; g < G; g++) qh[g] = qb + (h0 + g) * Dq, acc[g] = st.acc.data() + (h0 + g) * Dvp;
    float mb[G];
    for (int g = 0; g < G; g++) mb[g] = st.m[h0 + g];
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *c = rows + i * rs;
        __m512 a[G];
        for (int g = 0; g < G; g++) a[g] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 32) {
            const __m512i cv = _mm512_maskz_loadu_epi16(lanes32(D - d), c + d);
            for (int g = 0; g < G; g++)
                a[g] = _mm512_dpbf16_ps(a[g], (__m512bh)_mm512_loadu_si512(qh[g] + d), (__m512bh)cv);
        }
        for (int g = 0; g < G; g++) {
            const float dot = _mm512_reduce_add_ps(a[g]) * sc;
            sco[g * kBlock + i] = dot;
            mb[g] = std::max(mb[g], dot);
        }
    }
    for (int g = 0; g < G; g++) {  // online softmax with the weights rounded to bf16 before they are summed
        const float corr = std::exp(st.m[h0 + g] - mb[g]);
        float sum = st.s[h0 + g] * corr;
        for (int64_t d = 0; d < Dvp; d++) acc[g][d] *= corr;
        uint16_t pb[kBlock + 1];
        for (int64_t i = 0; i < n; i++) {
            const c10::BFloat16 p(std::exp(sco[g * kBlock + i] - mb[g]));
            pb[i] = p.x;
            sum += static_cast<float>(p);
        }
        pb[n] = 0;  // an odd block's last pair: (p_{n-1}, 0) against a zero row
        for (int64_t i = 0; i < n; i += 2) pair[g * kBlock + i / 2] = pb[i] | (static_cast<uint32_t>(pb[i + 1]) << 16);
        st.m[h0 + g] = mb[g];
        st.s[h0 + g] = sum;
    }
    for (int64_t d = 0; d < Dv; d += 32) {
        const __mmask32 mk = lanes32(Dv - d);
        __m512 lo[G], hi[G];
        for (int g = 0; g < G; g++) lo[g] = _mm512_loadu_ps(acc[g] + d), hi[g] = _mm512_loadu_ps(acc[g] + d + 16);
        for (int64_t i = 0; i < n; i += 2) {
            const __m512i r0 = _mm512_maskz_loadu_epi16(mk, rows + i * rs + d);
            const __m512i r1 = i + 1 < n ? _mm512_maskz_loadu_epi16(mk, rows + (i + 1) * rs + d) : _mm512_setzero_si512();
            const __m512bh ul = (__m512bh)_mm512_unpacklo_epi16(r0, r1), uh = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
            for (int g = 0; g < G; g++) {
                const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair[g * kBlock + i / 2]));
                lo[g] = _mm512_dpbf16_ps(lo[g], ul, pp);
                hi[g] = _mm512_dpbf16_ps(hi[g], uh, pp);
            }
        }
        for (int g = 0; g < G; g++) _mm512_storeu_ps(acc[g] + d, lo[g]), _mm512_storeu_ps(acc[g] + d + 16, hi[g]);
    }
}
#endif

at::Tensor mla_decode(const at::Tensor &q, const at::Tensor &past, const at::Tensor &new_, const at::Tensor &lengths,
                      double scale, int64_t value_dim) {
    TORCH_CHECK(q.device().is_cpu() && past.device().is_cpu(), "kimiq_cpu.mla_decode: CPU tensors only");
    TORCH_CHECK(q.dim() == 3 && past.dim() == 3 && new_.dim() == 2 && lengths.dim() == 1, "kimiq_cpu.mla_decode: q "
                "[B, H, D], past [B, L, D], new [B, D], lengths [B]");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = past.size(1), Dv = value_dim;
    TORCH_CHECK(past.size(0) == B && past.size(2) == D && new_.size(0) == B && new_.size(1) == D &&
                    lengths.size(0) == B && lengths.scalar_type() == at::kLong,
                "kimiq_cpu.mla_decode: shapes or lengths dtype do not match");
    TORCH_CHECK(Dv >= 1 && Dv <= D, "kimiq_cpu.mla_decode: value_dim must be in [1, D]");
    TORCH_CHECK(past.scalar_type() == at::kFloat || past.scalar_type() == at::kBFloat16, "kimiq_cpu.mla_decode: the "
                "cache must be float32 or bfloat16");
    TORCH_CHECK(past.stride(2) == 1, "kimiq_cpu.mla_decode: cache rows must be contiguous");
    const at::Tensor qf = q.to(at::kFloat).contiguous(), nf = new_.to(at::kFloat).contiguous(),
                     lc = lengths.contiguous();
    const bool bf16 = past.scalar_type() == at::kBFloat16;
#ifdef KIMIQ_MLA_BF16_DOTS
    const bool dots = bf16;
#else
    const bool dots = false;
#endif
    const int64_t Dq = (D + 31) / 32 * 32, Dvp = (Dv + 31) / 32 * 32, stride = dots ? Dvp : Dv;
    std::vector<int64_t> slot(Dv);  // output column -> accumulator index
    for (int64_t j = 0; j < Dv; j++) {
#ifdef KIMIQ_MLA_BF16_DOTS
        slot[j] = dots ? j / 32 * 32 + bf16_slot(j % 32) : j;
#else
        slot[j] = j;
#endif
    }
    at::Tensor o = at::empty({B, H, Dv}, q.options().dtype(at::kFloat));
    const float sc = static_cast<float>(scale);
    const int nt = at::get_num_threads();
    for (int64_t b = 0; b < B; b++) {
        const float *qb = qf.const_data_ptr<float>() + b * H * D, *nb = nf.const_data_ptr<float>() + b * D;
        std::vector<uint16_t> qbf(dots ? H * Dq : 0, 0);  // q rounded to bf16, rows zero-padded to Dq
        for (int64_t h = 0; dots && h < H; h++)
            for (int64_t d = 0; d < D; d++) qbf[h * Dq + d] = c10::BFloat16(qb[h * D + d]).x;
        const int64_t len = std::min<int64_t>(std::max<int64_t>(lc.const_data_ptr<int64_t>()[b], 0), L);
        const char *pb = static_cast<const char *>(past.const_data_ptr()) + b * past.stride(0) * past.element_size();
        const int64_t rstride = past.stride(1);
        // threads take contiguous ranges of whole blocks; part t = rows [t*chunk, (t+1)*chunk)
        const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(nt, len / (8 * kBlock)));
        const int64_t chunk = (len + parts - 1) / parts;
        std::vector<Partial> part(parts);
        at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
            std::vector<float> sco(H * kBlock);
            std::vector<uint32_t> pair(dots ? H * kBlock : 0);  // block_bf16's weights, two per row pair
            for (int64_t p = p0; p < p1; p++) {
                Partial &st = part[p];
                st.m.assign(H, -std::numeric_limits<float>::infinity());
                st.s.assign(H, 0.f);
                st.acc.assign(H * stride, 0.f);
                const int64_t r1 = std::min(len, (p + 1) * chunk);
                for (int64_t r0 = p * chunk; r0 < r1; r0 += kBlock) {
                    const int64_t n = std::min(kBlock, r1 - r0);
                    // heads in groups of 4 (each row read once for 4), the rest one at a time: run(G, first head)
                    auto heads = [&](auto &&run) {
                        for (int64_t h0 = 0; h0 < H; h0 += 4) {
                            if (H - h0 >= 4) run(std::integral_constant<int, 4>{}, h0);
                            else
                                for (int64_t h = h0; h < H; h++) run(std::integral_constant<int, 1>{}, h);
                        }
                    };
#ifdef KIMIQ_MLA_BF16_DOTS
                    if (dots) {
                        const uint16_t *rows = reinterpret_cast<const uint16_t *>(pb) + r0 * rstride;
                        heads([&](auto G, int64_t h) {
                            block_bf16<decltype(G)::value>(qbf.data(), Dq, h, D, Dv, Dvp, n, rows, rstride, sc, st, sco.data(),
                                            pair.data());
                        });
                        continue;
                    }
#endif
                    auto fp32_math = [&](const auto *rows) {  // fp32 rows, or bf16 rows widened in registers
                        heads([&](auto G, int64_t h) {
                            block<decltype(G)::value>(qb, h, D, Dv, n, rows, rstride, sc, st, sco.data());
                        });
                    };
                    if (bf16) fp32_math(reinterpret_cast<const uint16_t *>(pb) + r0 * rstride);
                    else fp32_math(reinterpret_cast<const float *>(pb) + r0 * rstride);
                }
            }
        });
        // merge the parts and the new row (always attended)
        float *ob = o.data_ptr<float>() + b * H * Dv;
        for (int64_t h = 0; h < H; h++) {
            const float *qh = qb + h * D;
            float sn = 0.f;
            for (int64_t d = 0; d < D; d++) sn += qh[d] * nb[d];
            sn *= sc;
            float M = sn;
            for (const Partial &st : part) M = std::max(M, st.m[h]);
            const float wn = std::exp(sn - M);
            float sum = wn;
            float *oh = ob + h * Dv;
            for (int64_t d = 0; d < Dv; d++) oh[d] = wn * nb[d];
            for (const Partial &st : part) {
                if (st.s[h] == 0.f) continue;  // no rows (m = -inf)
                const float w = std::exp(st.m[h] - M);
                sum += st.s[h] * w;
                const float *acc = st.acc.data() + h * stride;
                for (int64_t d = 0; d < Dv; d++) oh[d] += w * acc[slot[d]];
            }
            const float inv = 1.f / sum;
            for (int64_t d = 0; d < Dv; d++) oh[d] *= inv;
        }
    }
    return o;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kimiq_cpu, m) {
    m.def("mla_decode(Tensor q, Tensor past, Tensor new, Tensor lengths, float scale, int value_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(kimiq_cpu, CPU, m) { m.impl("mla_decode", mla_decode); }
