// CPU kernels of lowrank::aq_linear (see aq_linear_cpu.py for how they are built, chosen and registered).
//
// W[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m], :]   (AQLM, arXiv 2401.06118, Eq. 2)
//
// * codebook matrix-vector product (decode, the op's choice): per output and span of 8 inputs, the codewords
//   summed (one 8-lane vector: the M codewords of one group at g = 8, of two groups at g = 4) and multiplied into
//   the rows' slice of x; the weights never exist and only the codes (M*B bits a group) stream from memory.
// * lookup table (AQLM Sec. 4.3, one row): per group j and codebook m, LUT[j, m, k] = <codebooks[m, k], x_j>
//   (2^B dot products a group), then y[o] = scales[o] * sum_{j,m} LUT[j, m, codes[o, j, m]] + bias[o]. Measured
//   slower than the codebook product at every SmolLM2 shape (building the table costs as much as the sums it
//   saves); kept selectable so benchmarks/aq_speed.py can show it.
// * dequantize: the dense weight, for prefill (then one dense matmul for many rows).
//
// Every kernel accumulates in float32 and splits the output features over ATen's intra-op threads; operands in other
// dtypes (16-bit codebooks, bfloat16 inputs) are converted to float32 once a call (prepare).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

constexpr int64_t kMaxRows = AQ_MAX_ROWS;  // rows the vector kernels take (aq_linear_cpu.py MAX_MATVEC_ROWS)
constexpr int64_t kBlock = 8;      // output features a step (independent accumulation chains; measured: 8 > 4, 16)

template <typename code_t>
inline int64_t index_of(code_t code) {  // int16 storage holds the low 16 bits of the code
  return static_cast<int64_t>(static_cast<std::make_unsigned_t<code_t>>(code));
}

typedef float v8 __attribute__((vector_size(32)));  // eight lanes: one group of the default g = 8
typedef float v4 __attribute__((vector_size(16)));  // four lanes: one group at g = 4

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v4 load4(const float* p) {
  v4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One output's weights (before its scale) on inputs [8*span, 8*span + 8): the sum of its M codewords for the one
// group there at G = 8, or for each of the two groups at G = 4; ``c`` holds the output's codes, BOOKS a group
template <typename code_t, int BOOKS, int G>
inline v8 span_word(const code_t* c, int64_t span, int64_t size, const float* codebooks) {
  static_assert(G == 8 || G == 4, "the vector kernels take g = 8 or g = 4");
  if constexpr (G == 8) {
    c += span * BOOKS;
    v8 word = load8(codebooks + index_of(c[0]) * 8);
    for (int m = 1; m < BOOKS; ++m) word += load8(codebooks + (m * size + index_of(c[m])) * 8);
    return word;
  } else {
    const code_t* lo = c + 2 * span * BOOKS;
    const code_t* hi = lo + BOOKS;
    v4 first = load4(codebooks + index_of(lo[0]) * 4), second = load4(codebooks + index_of(hi[0]) * 4);
    for (int m = 1; m < BOOKS; ++m) {
      first += load4(codebooks + (m * size + index_of(lo[m])) * 4);
      second += load4(codebooks + (m * size + index_of(hi[m])) * 4);
    }
    return __builtin_shufflevector(first, second, 0, 1, 2, 3, 4, 5, 6, 7);  // in registers, not through memory
  }
}

inline float sum8(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// table[j][m][k] = <codebooks[m, k], x[j*g:(j+1)*g]> for one row; words_t [M][g][2^B] (codebooks transposed, so
// eight codewords' dot products are one vector multiply-add a coordinate)
void build_lut(const float* x, int64_t groups, int64_t books, int64_t size, const float* words_t, int64_t g,
               float* table) {
  at::parallel_for(0, groups, 8, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t m = 0; m < books; ++m) {
        float* entry = table + (j * books + m) * size;
        const float* cols = words_t + m * g * size;
        for (int64_t k = 0; k < size; k += 8) {
          v8 dot = {};
          for (int64_t t = 0; t < g; ++t) dot += load8(cols + t * size + k) * x[j * g + t];
          std::memcpy(entry + k, &dot, sizeof dot);
        }
      }
    }
  });
}

// y[o] = scales[o] * sum_{j,m} table[j, m, codes[o, j, m]] + bias[o]; BLOCK outputs a step (independent chains)
template <typename code_t, int BOOKS, int BLOCK>
inline void lut_block(const float* table, const code_t* codes, int64_t o0, int64_t groups, int64_t size,
                      const float* scales, const float* bias, float* y) {
  float acc[BLOCK] = {};
  const int64_t stride = groups * BOOKS;
  for (int64_t j = 0; j < groups; ++j) {
    const float* entry = table + j * BOOKS * size;
    for (int b = 0; b < BLOCK; ++b) {
      const code_t* c = codes + (o0 + b) * stride + j * BOOKS;
      for (int m = 0; m < BOOKS; ++m) acc[b] += entry[m * size + index_of(c[m])];
    }
  }
  for (int b = 0; b < BLOCK; ++b) y[o0 + b] = acc[b] * scales[o0 + b] + (bias ? bias[o0 + b] : 0.f);
}

template <typename code_t, int BOOKS>
void lut_sum(const float* table, const code_t* codes, int64_t out, int64_t groups, int64_t size,
             const float* scales, const float* bias, float* y) {
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    int64_t o = begin;
    for (; o + kBlock <= end; o += kBlock)
      lut_block<code_t, BOOKS, kBlock>(table, codes, o, groups, size, scales, bias, y);
    for (; o < end; ++o) lut_block<code_t, BOOKS, 1>(table, codes, o, groups, size, scales, bias, y);
  });
}

// ROWS rows x BLOCK outputs of the codebook matrix-vector product: each output's span of 8 inputs is its codewords'
// sum (one vector, span_word), multiplied into each row's slice of x; lanes are summed once at the end
template <typename code_t, int BOOKS, int G, int BLOCK, int ROWS>
inline void codebook_block(const float* x, int64_t in, const code_t* codes, int64_t o0, int64_t groups, int64_t size,
                           const float* codebooks, const float* scales, const float* bias, float* y, int64_t out) {
  v8 acc[BLOCK][ROWS] = {};
  const int64_t stride = groups * BOOKS;
  for (int64_t j = 0; j < in / 8; ++j) {
    v8 word[BLOCK];
    for (int b = 0; b < BLOCK; ++b) word[b] = span_word<code_t, BOOKS, G>(codes + (o0 + b) * stride, j, size, codebooks);
    for (int r = 0; r < ROWS; ++r) {
      const v8 xs = load8(x + r * in + j * 8);
      for (int b = 0; b < BLOCK; ++b) acc[b][r] += word[b] * xs;
    }
  }
  for (int b = 0; b < BLOCK; ++b)
    for (int r = 0; r < ROWS; ++r)
      y[r * out + o0 + b] = sum8(acc[b][r]) * scales[o0 + b] + (bias ? bias[o0 + b] : 0.f);
}

// BLOCK x ROWS accumulators (plus BLOCK codewords) fit the 32 vector registers of AVX-512 (16 of AVX2 at one row)
template <typename code_t, int BOOKS, int G, int ROWS>
void codebook_rows(const float* x, int64_t in, const code_t* codes, int64_t out, int64_t groups, int64_t size,
                   const float* codebooks, const float* scales, const float* bias, float* y) {
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    constexpr int64_t block = ROWS == 1 ? kBlock : kBlock / 2;
    int64_t o = begin;
    for (; o + block <= end; o += block)
      codebook_block<code_t, BOOKS, G, block, ROWS>(x, in, codes, o, groups, size, codebooks, scales, bias, y, out);
    for (; o < end; ++o)
      codebook_block<code_t, BOOKS, G, 1, ROWS>(x, in, codes, o, groups, size, codebooks, scales, bias, y, out);
  });
}

// rows in chunks of four (the accumulators of 4 outputs x 4 rows stay in registers)
template <typename code_t, int BOOKS, int G>
void codebook_matvec(const float* x, int64_t rows, int64_t in, const code_t* codes, int64_t out, int64_t groups,
                     int64_t size, const float* codebooks, const float* scales, const float* bias, float* y) {
  for (int64_t r = 0; r < rows;) {
    const int64_t left = rows - r;
    const float* xr = x + r * in;
    float* yr = y + r * out;
    if (left >= 4) {
      codebook_rows<code_t, BOOKS, G, 4>(xr, in, codes, out, groups, size, codebooks, scales, bias, yr);
      r += 4;
    } else if (left >= 2) {
      codebook_rows<code_t, BOOKS, G, 2>(xr, in, codes, out, groups, size, codebooks, scales, bias, yr);
      r += 2;
    } else {
      codebook_rows<code_t, BOOKS, G, 1>(xr, in, codes, out, groups, size, codebooks, scales, bias, yr);
      r += 1;
    }
  }
}

// One group's weights, scale * sum_m codebooks[m, c[m]], at a group size of one vector (vec: v8 or v4)
template <typename vec, typename code_t>
inline void dequantize_group(const code_t* c, int64_t books, int64_t size, const float* codebooks, float scale,
                             float* w) {
  constexpr int64_t g = sizeof(vec) / sizeof(float);
  vec word, next;
  std::memcpy(&word, codebooks + index_of(c[0]) * g, sizeof word);
  for (int64_t m = 1; m < books; ++m) {
    std::memcpy(&next, codebooks + (m * size + index_of(c[m])) * g, sizeof next);
    word += next;
  }
  word *= scale;
  std::memcpy(w, &word, sizeof word);
}

template <typename code_t>
void dequantize_into(const code_t* codes, int64_t out, int64_t groups, int64_t books, int64_t size,
                     const float* codebooks, int64_t g, const float* scales, float* weight) {
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float scale = scales[o];
      for (int64_t j = 0; j < groups; ++j) {
        float* w = weight + (o * groups + j) * g;
        const code_t* c = codes + (o * groups + j) * books;
        if (g == 8) {
          dequantize_group<v8>(c, books, size, codebooks, scale, w);
          continue;
        }
        if (g == 4) {
          dequantize_group<v4>(c, books, size, codebooks, scale, w);
          continue;
        }
        for (int64_t t = 0; t < g; ++t) w[t] = 0.f;
        for (int64_t m = 0; m < books; ++m) {
          const float* word = codebooks + (m * size + index_of(c[m])) * g;
          for (int64_t t = 0; t < g; ++t) w[t] += word[t];
        }
        for (int64_t t = 0; t < g; ++t) w[t] *= scale;
      }
    }
  });
}

struct Operands {
  at::Tensor x, codes, codebooks, scales, bias;  // x [rows, in], the rest float32 (bias undefined when absent)
  int64_t rows, in, out, groups, books, size, g;
};

Operands prepare(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                 const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(codes.dim() == 3 && codebooks.dim() == 3 && codebooks.size(0) == codes.size(2) &&
                  x.size(-1) == codes.size(1) * codebooks.size(2) && scales.numel() == codes.size(0),
              "aq_linear: input ", x.sizes(), ", codes ", codes.sizes(), ", codebooks ", codebooks.sizes(),
              " and scales ", scales.sizes(), " do not agree (in_features = groups * group_size)");
  TORCH_CHECK(codes.scalar_type() == at::kByte || codes.scalar_type() == at::kShort,
              "aq_linear: codes must be uint8 or int16, got ", codes.scalar_type());
  Operands p;
  p.in = x.size(-1);
  p.x = x.reshape({-1, p.in}).to(at::kFloat).contiguous();
  p.codes = codes.contiguous();
  p.codebooks = codebooks.to(at::kFloat).contiguous();
  p.scales = scales.to(at::kFloat).contiguous();
  if (bias.has_value()) p.bias = bias->to(at::kFloat).contiguous();
  p.rows = p.x.size(0);
  p.out = codes.size(0);
  p.groups = codes.size(1);
  p.books = codes.size(2);
  p.size = codebooks.size(1);
  p.g = codebooks.size(2);
  return p;
}

enum Kernel : int64_t { kChoose = 0, kTable = 1, kCodebook = 2, kDequantize = 3 };

// The kernel for these operands (measured on SmolLM2's shapes, benchmarks/aq_speed.py): the codebook product for
// decode rows (it beats the table at every shape measured: at g = 8 a group's codeword sum is one vector and its
// product with x one multiply-add, as cheap as the table's M reads, with no table to build); dequantize + matmul
// for many rows (prefill) or shapes the vector kernels do not cover.
Kernel choose(const Operands& p) {
  const bool spans = p.g == 8 || (p.g == 4 && p.in % 8 == 0);  // whole 8-lane spans of one or two groups
  const bool vector_shape = spans && p.size % 8 == 0 && (p.books == 1 || p.books == 2);
  return vector_shape && p.rows <= kMaxRows ? kCodebook : kDequantize;
}

template <typename code_t, int BOOKS>
void matvec(const Operands& p, Kernel kernel, float* out) {
  const code_t* codes = p.codes.data_ptr<code_t>();
  const float* bias = p.bias.defined() ? p.bias.data_ptr<float>() : nullptr;
  const float* x = p.x.data_ptr<float>();
  const float* cb = p.codebooks.data_ptr<float>();
  const float* s = p.scales.data_ptr<float>();
  if (kernel == kCodebook) {
    if (p.g == 8)
      codebook_matvec<code_t, BOOKS, 8>(x, p.rows, p.in, codes, p.out, p.groups, p.size, cb, s, bias, out);
    else
      codebook_matvec<code_t, BOOKS, 4>(x, p.rows, p.in, codes, p.out, p.groups, p.size, cb, s, bias, out);
    return;
  }
  const auto words_t = p.codebooks.transpose(1, 2).contiguous();  // [M, g, 2^B]
  auto table = at::empty({p.groups * p.books * p.size}, p.x.options());
  build_lut(x, p.groups, p.books, p.size, words_t.data_ptr<float>(), p.g, table.data_ptr<float>());
  lut_sum<code_t, BOOKS>(table.data_ptr<float>(), codes, p.out, p.groups, p.size, s, bias, out);
}

at::Tensor dequantize_matmul(const Operands& p, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  auto weight = at::empty({p.out, p.in}, p.x.options());
  const float* cb = p.codebooks.data_ptr<float>();
  const float* s = p.scales.data_ptr<float>();
  float* w = weight.data_ptr<float>();
  if (p.codes.scalar_type() == at::kByte)
    dequantize_into(p.codes.data_ptr<uint8_t>(), p.out, p.groups, p.books, p.size, cb, p.g, s, w);
  else
    dequantize_into(p.codes.data_ptr<int16_t>(), p.out, p.groups, p.books, p.size, cb, p.g, s, w);
  const auto dtype = x.scalar_type();
  return at::linear(x, weight.to(dtype), bias.has_value() ? c10::optional<at::Tensor>(bias->to(dtype)) : bias);
}

// kernel: kChoose picks by shape (see choose); the others force one (the benchmark and the tests compare them)
at::Tensor aq_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                         const at::Tensor& scales, const c10::optional<at::Tensor>& bias, int64_t kernel) {
  const Operands p = prepare(x, codes, codebooks, scales, bias);
  Kernel k = kernel == kChoose ? choose(p) : static_cast<Kernel>(kernel);
  TORCH_CHECK(k >= kTable && k <= kDequantize, "aq_linear: unknown CPU kernel ", kernel);
  if (k == kDequantize) return dequantize_matmul(p, x, bias);
  TORCH_CHECK(choose(p) == kCodebook, "aq_linear: the vector kernels need g = 8 (or g = 4 with in_features a multiple ",
              "of 8), M <= 2 and at most ", kMaxRows,
              " rows; got g = ", p.g, ", M = ", p.books, ", ", p.rows, " rows");
  TORCH_CHECK(k != kTable || p.rows == 1, "aq_linear: the table kernel takes one row, got ", p.rows);
  auto y = at::empty({p.rows, p.out}, p.x.options());
  float* out = y.data_ptr<float>();
  const bool bytes = p.codes.scalar_type() == at::kByte;
  if (p.books == 1)
    bytes ? matvec<uint8_t, 1>(p, k, out) : matvec<int16_t, 1>(p, k, out);
  else
    bytes ? matvec<uint8_t, 2>(p, k, out) : matvec<int16_t, 2>(p, k, out);
  auto sizes = x.sizes().vec();
  sizes.back() = p.out;
  return y.view(sizes).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(lowrank_aq_cpu, m) {
  m.def("aq_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias, int kernel) -> Tensor");
  m.impl("aq_linear", c10::DispatchKey::CPU, &aq_linear_cpu);
}
