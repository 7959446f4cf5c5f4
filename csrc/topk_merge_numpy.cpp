// The Python module karma_kernels._C, and its one function: the small-call path of topk_merge for numpy.
//
// Importing the module registers the torch ops (the TORCH_LIBRARY blocks of the other files). merge_small takes
// topk_merge's own arguments and merges a stacked (S, Q, W) float32/float64 numpy array straight from its memory into
// output arrays it allocates: at one query per call (the serving case) building tensors and dispatching would cost
// more than merging, and so would checking the arguments in Python. It takes only what needs no checks beyond the
// arrays' (no id offsets, no dedup, backend "auto", rows contiguous, native byte order) and answers None for
// anything else, or when sorted=True meets a row out of order; the Python wrapper then takes the op's path, which
// raises the op's errors.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <cstdint>
#include <exception>

#include "topk_merge_cpu_small.h"

namespace karma {
template <typename scalar_t>
bool merge_stacked_rows(const scalar_t* distances, const int64_t* ids, int64_t num_shards, int64_t num_queries,
                        int64_t width, const int64_t distance_strides[2], const int64_t id_strides[2], int64_t k,
                        bool largest, bool sorted, scalar_t* out_distances, int64_t* out_ids);
}  // namespace karma

namespace {

constexpr long long kMaxK = (1LL << 31) - 1;              // the wrapper's MAX_K
constexpr long long kMaxPaddedOutput = 1LL << 31;         // the wrapper's MAX_PADDED_OUTPUT
// Candidates read per call (Q * (k + S)) up to which the small merge runs on the calling thread with the GIL held
// (about 10 us); a larger call releases the GIL and takes the op's CPU merge (threads when it is large).
constexpr int64_t kInlineWork = 2048;

PyObject* interned_l2 = nullptr;
PyObject* interned_ip = nullptr;
PyObject* interned_auto = nullptr;

// The exact str `text` (a literal in the caller's code is the interned object: one pointer compare).
bool is_text(PyObject* object, PyObject* interned, const char* text) {
  return object == interned || (PyUnicode_CheckExact(object) && PyUnicode_CompareWithASCIIString(object, text) == 0);
}

// A plain (not a subclass), aligned, native-byte-order 3-D ndarray whose element type passes `kind`.
bool plain_array(PyObject* object, bool (*kind)(PyArrayObject*)) {
  if (!PyArray_CheckExact(object)) return false;
  PyArrayObject* array = reinterpret_cast<PyArrayObject*>(object);
  return PyArray_NDIM(array) == 3 && kind(array) && PyArray_ISNOTSWAPPED(array) && PyArray_ISALIGNED(array);
}

bool is_float(PyArrayObject* array) { return PyArray_TYPE(array) == NPY_FLOAT || PyArray_TYPE(array) == NPY_DOUBLE; }
bool is_int64(PyArrayObject* array) {
  return (PyArray_TYPE(array) == NPY_LONG || PyArray_TYPE(array) == NPY_LONGLONG) && PyArray_ITEMSIZE(array) == 8;
}

template <typename scalar_t>
bool merge(PyArrayObject* d, PyArrayObject* i, int64_t k, bool largest, bool sorted, scalar_t* out_distances,
           int64_t* out_ids) {
  const npy_intp* shape = PyArray_DIMS(d);
  const int64_t num_shards = shape[0], num_queries = shape[1], width = shape[2];
  const npy_intp* d_bytes = PyArray_STRIDES(d);
  const npy_intp* i_bytes = PyArray_STRIDES(i);
  const int64_t distance_strides[2] = {d_bytes[0] / static_cast<npy_intp>(sizeof(scalar_t)),
                                       d_bytes[1] / static_cast<npy_intp>(sizeof(scalar_t))};
  const int64_t id_strides[2] = {i_bytes[0] / 8, i_bytes[1] / 8};
  const auto* distances = static_cast<const scalar_t*>(PyArray_DATA(d));
  const auto* ids = static_cast<const int64_t*>(PyArray_DATA(i));
  if (sorted && k <= karma::cpu_merge::kSmallMergeMaxK && num_shards <= karma::cpu_merge::kSmallMergeMaxShards &&
      num_queries * (k + num_shards) <= kInlineWork) {
    karma::cpu_merge::ShardRows<scalar_t> shards[karma::cpu_merge::kSmallMergeMaxShards];
    for (int64_t s = 0; s < num_shards; ++s) {
      shards[s] = {distances + s * distance_strides[0], ids + s * id_strides[0], distance_strides[1], id_strides[1],
                   width, 0};
    }
    karma::InputErrorReport errors;
    return largest ? karma::cpu_merge::small_merge_queries<scalar_t, true>(shards, num_shards, 0, num_queries, k,
                                                                           out_distances, out_ids, errors)
                   : karma::cpu_merge::small_merge_queries<scalar_t, false>(shards, num_shards, 0, num_queries, k,
                                                                            out_distances, out_ids, errors);
  }
  bool merged = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    merged = karma::merge_stacked_rows<scalar_t>(distances, ids, num_shards, num_queries, width, distance_strides,
                                                 id_strides, k, largest, sorted, out_distances, out_ids);
  } catch (const std::exception&) {
    merged = false;  // the op's path raises it with the op's message
  }
  Py_END_ALLOW_THREADS
  return merged;
}

// merge_small(distances, ids, k, metric, id_offsets, sorted, dedup, backend) -> (distances, ids) or None (see the
// file's comment): topk_merge's arguments as the caller passed them.
PyObject* merge_small(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "merge_small(distances, ids, k, metric, id_offsets, sorted, dedup, backend)");
    return nullptr;
  }
  PyObject* const metric = args[3];
  const bool largest = is_text(metric, interned_ip, "ip");
  if (!plain_array(args[0], is_float) || !plain_array(args[1], is_int64) || !PyLong_CheckExact(args[2]) || args[4] != Py_None ||
      (args[5] != Py_True && args[5] != Py_False) || args[6] != Py_False ||
      !is_text(args[7], interned_auto, "auto") || !(largest || is_text(metric, interned_l2, "l2"))) {
    Py_RETURN_NONE;
  }
  PyArrayObject* d = reinterpret_cast<PyArrayObject*>(args[0]);
  PyArrayObject* i = reinterpret_cast<PyArrayObject*>(args[1]);
  const long long k = PyLong_AsLongLong(args[2]);
  if (k == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  const npy_intp* shape = PyArray_DIMS(d);
  const npy_intp itemsize = PyArray_ITEMSIZE(d);
  bool fits = k >= 1 && k <= kMaxK && shape[0] >= 1;
  for (int dim = 0; fits && dim < 3; ++dim) {
    fits = PyArray_DIMS(i)[dim] == shape[dim] && PyArray_STRIDES(d)[dim] % itemsize == 0 &&
           PyArray_STRIDES(i)[dim] % 8 == 0;
  }
  fits = fits && (shape[2] <= 1 || (PyArray_STRIDES(d)[2] == itemsize && PyArray_STRIDES(i)[2] == 8));
  // k may exceed the candidates per query (padding), but not into a huge output (the op's ValueError).
  fits = fits && (k <= shape[0] * shape[2] || shape[1] * k <= kMaxPaddedOutput);
  if (!fits) Py_RETURN_NONE;
  npy_intp out_shape[2] = {shape[1], static_cast<npy_intp>(k)};
  const bool is_float32 = PyArray_TYPE(d) == NPY_FLOAT;
  PyObject* out_distances = PyArray_SimpleNew(2, out_shape, is_float32 ? NPY_FLOAT : NPY_DOUBLE);
  if (out_distances == nullptr) return nullptr;
  PyObject* out_ids = PyArray_SimpleNew(2, out_shape, NPY_INT64);
  if (out_ids == nullptr) {
    Py_DECREF(out_distances);
    return nullptr;
  }
  void* od = PyArray_DATA(reinterpret_cast<PyArrayObject*>(out_distances));
  auto* oi = static_cast<int64_t*>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(out_ids)));
  const bool sorted = args[5] == Py_True;
  const bool merged = is_float32 ? merge<float>(d, i, k, largest, sorted, static_cast<float*>(od), oi)
                                 : merge<double>(d, i, k, largest, sorted, static_cast<double*>(od), oi);
  if (!merged) {
    Py_DECREF(out_distances);
    Py_DECREF(out_ids);
    Py_RETURN_NONE;
  }
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) {
    Py_DECREF(out_distances);
    Py_DECREF(out_ids);
    return nullptr;
  }
  PyTuple_SET_ITEM(result, 0, out_distances);  // steals the references
  PyTuple_SET_ITEM(result, 1, out_ids);
  return result;
}

PyMethodDef methods[] = {
    {"merge_small", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(merge_small)), METH_FASTCALL,
     "topk_merge's small-call path for stacked numpy arrays (see csrc/topk_merge_numpy.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  if (_import_array() < 0) return nullptr;  // numpy's C API (numpy is a dependency)
  interned_l2 = PyUnicode_InternFromString("l2");
  interned_ip = PyUnicode_InternFromString("ip");
  interned_auto = PyUnicode_InternFromString("auto");
  if (interned_l2 == nullptr || interned_ip == nullptr || interned_auto == nullptr) return nullptr;
  return PyModule_Create(&module_def);
}
