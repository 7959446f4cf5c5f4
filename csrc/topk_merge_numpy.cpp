// The Python module karma_kernels._C, and its one function: the small-call path of topk_merge for numpy arrays and
// CPU tensors.
//
// Importing the module registers the torch ops (the TORCH_LIBRARY blocks of the other files). merge_small takes
// topk_merge's own arguments and merges numpy rows straight from their memory into output arrays it allocates: at
// one query per call (the serving case) building tensors and dispatching would cost more than merging, and so would
// checking the arguments in Python. It takes
// - a stacked (S, Q, W) float32/float64 array with its int64 ids, any size (a large call releases the GIL and takes
//   the op's CPU merge), without id offsets; or the same as a pair of plain dense CPU tensors (torch.Tensor itself,
//   not a subclass; no negative or conjugate bit), whose outputs are then tensors too;
// - and for a small sorted call (k <= 32, S <= 16, Q * (k + S) <= kInlineWork candidates read), also a list or
//   tuple of S (Q, k_s) arrays (k_s may differ; what ShardedIndex.search passes), and id offsets as a list or tuple
//   of ints or a 1-D int64 array;
// plain ndarrays only (no subclass), native byte order, aligned, rows contiguous, no dedup, backend "auto". It
// answers None for anything else, or when the merge meets bad input (a row out of order with sorted=True, an id
// that its offset takes out of int64); the Python wrapper then takes the op's path, which raises the op's errors.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <ATen/EmptyTensor.h>
#include <torch/csrc/autograd/python_variable.h>

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

using karma::cpu_merge::kSmallMergeMaxK;
using karma::cpu_merge::kSmallMergeMaxShards;
template <typename scalar_t>
using ShardRows = karma::cpu_merge::ShardRows<scalar_t>;

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

bool is_float(PyArrayObject* array) { return PyArray_TYPE(array) == NPY_FLOAT || PyArray_TYPE(array) == NPY_DOUBLE; }
bool is_int64(PyArrayObject* array) {
  return (PyArray_TYPE(array) == NPY_LONG || PyArray_TYPE(array) == NPY_LONGLONG) && PyArray_ITEMSIZE(array) == 8;
}

// A plain (not a subclass), aligned, native-byte-order ndarray of `ndim` dimensions whose element type passes
// `kind`, with every stride a whole number of elements and its rows (the last dimension) contiguous; or nullptr.
PyArrayObject* plain_rows(PyObject* object, int ndim, bool (*kind)(PyArrayObject*)) {
  if (!PyArray_CheckExact(object)) return nullptr;
  PyArrayObject* array = reinterpret_cast<PyArrayObject*>(object);
  if (PyArray_NDIM(array) != ndim || !kind(array) || !PyArray_ISNOTSWAPPED(array) || !PyArray_ISALIGNED(array)) {
    return nullptr;
  }
  const npy_intp itemsize = PyArray_ITEMSIZE(array);
  for (int dim = 0; dim < ndim; ++dim) {
    if (PyArray_STRIDES(array)[dim] % itemsize != 0) return nullptr;
  }
  const bool rows_contiguous = PyArray_DIMS(array)[ndim - 1] <= 1 || PyArray_STRIDES(array)[ndim - 1] == itemsize;
  return rows_contiguous ? array : nullptr;
}

int64_t element_stride(PyArrayObject* array, int dim) {
  return PyArray_STRIDES(array)[dim] / PyArray_ITEMSIZE(array);
}

bool same_shape(PyArrayObject* a, PyArrayObject* b) {
  for (int dim = 0; dim < PyArray_NDIM(a); ++dim) {
    if (PyArray_DIMS(a)[dim] != PyArray_DIMS(b)[dim]) return false;
  }
  return true;
}

// id_offsets: None (all 0), a list or tuple of S ints that fit int64, or a 1-D int64 array of S. False for anything
// else (the wrapper converts or rejects it).
bool read_offsets(PyObject* object, int64_t num_shards, int64_t* offsets) {
  if (object == Py_None) {
    for (int64_t s = 0; s < num_shards; ++s) offsets[s] = 0;
    return true;
  }
  if (PyList_CheckExact(object) || PyTuple_CheckExact(object)) {
    if (PySequence_Fast_GET_SIZE(object) != num_shards) return false;
    PyObject** items = PySequence_Fast_ITEMS(object);
    for (int64_t s = 0; s < num_shards; ++s) {
      if (!PyLong_CheckExact(items[s])) return false;  // bool, numpy ints, ...: the wrapper's checks
      offsets[s] = PyLong_AsLongLong(items[s]);
      if (offsets[s] == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return false;
      }
    }
    return true;
  }
  PyArrayObject* array = plain_rows(object, 1, is_int64);
  if (array == nullptr || PyArray_DIMS(array)[0] != num_shards) return false;
  const auto* values = static_cast<const int64_t*>(PyArray_DATA(array));
  for (int64_t s = 0; s < num_shards; ++s) offsets[s] = values[s];
  return true;
}

// The outputs: a (Q, k) array of the distances' type and one of int64 (tensors when `tensors`), as a tuple, and
// their data; nullptr (an exception set) when allocation fails.
PyObject* new_outputs(npy_intp num_queries, npy_intp k, int type_num, bool tensors, void** out_distances,
                      int64_t** out_ids) {
  PyObject *distances = nullptr, *ids = nullptr;
  if (tensors) {
    try {
      // straight from the CPU allocator (no dispatch: a Q = 1 call is a few microseconds in all)
      const at::ScalarType dtype = type_num == NPY_FLOAT ? at::kFloat : at::kDouble;
      const at::TensorBase d = at::detail::empty_cpu({num_queries, k}, dtype);
      const at::TensorBase i = at::detail::empty_cpu({num_queries, k}, at::kLong);
      *out_distances = d.data_ptr();
      *out_ids = static_cast<int64_t*>(i.data_ptr());
      distances = THPVariable_Wrap(d);
      ids = distances == nullptr ? nullptr : THPVariable_Wrap(i);
    } catch (const std::exception& error) {
      PyErr_SetString(PyExc_MemoryError, error.what());
    }
  } else {
    npy_intp shape[2] = {num_queries, k};
    distances = PyArray_SimpleNew(2, shape, type_num);
    ids = distances == nullptr ? nullptr : PyArray_SimpleNew(2, shape, NPY_INT64);
    if (ids != nullptr) {
      *out_distances = PyArray_DATA(reinterpret_cast<PyArrayObject*>(distances));
      *out_ids = static_cast<int64_t*>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(ids)));
    }
  }
  PyObject* result = ids == nullptr ? nullptr : PyTuple_New(2);
  if (result == nullptr) {
    Py_XDECREF(distances);
    Py_XDECREF(ids);
    return nullptr;
  }
  PyTuple_SET_ITEM(result, 0, distances);  // steals the references
  PyTuple_SET_ITEM(result, 1, ids);
  return result;
}

// New outputs filled by merge(out_distances, out_ids) -> bool; None when it answers false (bad input).
template <typename scalar_t, typename Merge>
PyObject* merge_into_new_outputs(int64_t num_queries, int64_t k, int type_num, bool tensors, const Merge& merge) {
  void* out_distances = nullptr;
  int64_t* out_ids = nullptr;
  PyObject* outputs = new_outputs(num_queries, k, type_num, tensors, &out_distances, &out_ids);
  if (outputs == nullptr) return nullptr;
  if (merge(static_cast<scalar_t*>(out_distances), out_ids)) return outputs;
  Py_DECREF(outputs);
  Py_RETURN_NONE;
}

bool runs_inline(bool sorted, int64_t k, int64_t num_shards, int64_t num_queries) {
  return sorted && k <= kSmallMergeMaxK && num_shards <= kSmallMergeMaxShards &&
         num_queries * (k + num_shards) <= kInlineWork;
}

// The small merge of these rows on the calling thread into new outputs; None on bad input.
template <typename scalar_t>
PyObject* merge_inline(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t num_queries, int64_t k,
                       bool largest, int type_num, bool tensors = false) {
  return merge_into_new_outputs<scalar_t>(num_queries, k, type_num, tensors,
                                          [&](scalar_t* out_distances, int64_t* out_ids) {
    karma::InputErrorReport errors;
    return largest ? karma::cpu_merge::small_merge_queries<scalar_t, true>(shards, num_shards, 0, num_queries, k,
                                                                           out_distances, out_ids, errors)
                   : karma::cpu_merge::small_merge_queries<scalar_t, false>(shards, num_shards, 0, num_queries, k,
                                                                            out_distances, out_ids, errors);
  });
}

// A stacked (S, Q, W) input with ids of the same shape, as numpy arrays or as tensors (then `tensors`: tensor
// outputs). Strides in elements; rows contiguous.
struct Stacked {
  const void* distances;
  const int64_t* ids;
  int64_t shape[3];
  int64_t distance_strides[2];  // of dimensions 0 and 1
  int64_t id_strides[2];
  int type_num;                 // NPY_FLOAT or NPY_DOUBLE
  bool tensors;
};

Stacked stacked_arrays(PyArrayObject* d, PyArrayObject* i) {
  const npy_intp* shape = PyArray_DIMS(d);
  return Stacked{PyArray_DATA(d), static_cast<const int64_t*>(PyArray_DATA(i)), {shape[0], shape[1], shape[2]},
                 {element_stride(d, 0), element_stride(d, 1)}, {element_stride(i, 0), element_stride(i, 1)},
                 PyArray_TYPE(d), false};
}

template <typename scalar_t>
PyObject* merge_stacked(const Stacked& in, PyObject* id_offsets, int64_t k, bool largest, bool sorted) {
  const int64_t num_shards = in.shape[0], num_queries = in.shape[1], width = in.shape[2];
  const auto* distances = static_cast<const scalar_t*>(in.distances);
  if (runs_inline(sorted, k, num_shards, num_queries)) {
    int64_t offsets[kSmallMergeMaxShards];
    if (!read_offsets(id_offsets, num_shards, offsets)) Py_RETURN_NONE;
    ShardRows<scalar_t> shards[kSmallMergeMaxShards];
    for (int64_t s = 0; s < num_shards; ++s) {
      shards[s] = {distances + s * in.distance_strides[0], in.ids + s * in.id_strides[0], in.distance_strides[1],
                   in.id_strides[1], width, offsets[s]};
    }
    return merge_inline(shards, num_shards, num_queries, k, largest, in.type_num, in.tensors);
  }
  if (id_offsets != Py_None) Py_RETURN_NONE;
  return merge_into_new_outputs<scalar_t>(num_queries, k, in.type_num, in.tensors,
                                          [&](scalar_t* out_distances, int64_t* out_ids) {
    bool merged = false;
    Py_BEGIN_ALLOW_THREADS
    try {
      merged = karma::merge_stacked_rows<scalar_t>(distances, in.ids, num_shards, num_queries, width,
                                                   in.distance_strides, in.id_strides, k, largest, sorted,
                                                   out_distances, out_ids);
    } catch (const std::exception&) {
      merged = false;  // the op's path raises it with the op's message
    }
    Py_END_ALLOW_THREADS
    return merged;
  });
}

// A pair of plain CPU tensors as a Stacked input (false when the path does not take them: the op's way then).
bool stacked_tensors(PyObject* distances, PyObject* ids, Stacked* out) {
  if (!THPVariable_CheckExact(distances) || !THPVariable_CheckExact(ids)) return false;
  const at::Tensor& d = THPVariable_Unpack(distances);
  const at::Tensor& i = THPVariable_Unpack(ids);
  const auto plain = [](const at::Tensor& t, at::ScalarType a, at::ScalarType b) {
    return t.has_storage() && t.device().is_cpu() && t.layout() == at::kStrided && !t.is_neg() && !t.is_conj() &&
           (t.scalar_type() == a || t.scalar_type() == b) && t.dim() == 3 && (t.size(2) <= 1 || t.stride(2) == 1);
  };
  if (!plain(d, at::kFloat, at::kDouble) || !plain(i, at::kLong, at::kLong) || d.sizes() != i.sizes()) return false;
  *out = Stacked{d.data_ptr(), i.data_ptr<int64_t>(), {d.size(0), d.size(1), d.size(2)},
                 {d.stride(0), d.stride(1)}, {i.stride(0), i.stride(1)},
                 d.scalar_type() == at::kFloat ? NPY_FLOAT : NPY_DOUBLE, true};
  return true;
}

// A list or tuple of S (Q, k_s) arrays with ids of the same shapes; the small merge only.
template <typename scalar_t>
PyObject* merge_listed(PyObject* distance_list, PyObject* id_list, PyObject* id_offsets, int64_t k, bool largest,
                       bool sorted) {
  const int64_t num_shards = PySequence_Fast_GET_SIZE(distance_list);
  PyObject** distance_items = PySequence_Fast_ITEMS(distance_list);
  PyObject** id_items = PySequence_Fast_ITEMS(id_list);
  const int type_num = PyArray_TYPE(reinterpret_cast<PyArrayObject*>(distance_items[0]));
  const int64_t num_queries = PyArray_DIMS(reinterpret_cast<PyArrayObject*>(distance_items[0]))[0];
  int64_t offsets[kSmallMergeMaxShards];
  if (!runs_inline(sorted, k, num_shards, num_queries) || !read_offsets(id_offsets, num_shards, offsets)) {
    Py_RETURN_NONE;
  }
  ShardRows<scalar_t> shards[kSmallMergeMaxShards];
  for (int64_t s = 0; s < num_shards; ++s) {
    PyArrayObject* d = plain_rows(distance_items[s], 2, is_float);
    PyArrayObject* i = plain_rows(id_items[s], 2, is_int64);
    if (d == nullptr || i == nullptr || PyArray_TYPE(d) != type_num || !same_shape(d, i) ||
        PyArray_DIMS(d)[0] != num_queries) {
      Py_RETURN_NONE;
    }
    shards[s] = {static_cast<const scalar_t*>(PyArray_DATA(d)), static_cast<const int64_t*>(PyArray_DATA(i)),
                 element_stride(d, 0), element_stride(i, 0), PyArray_DIMS(d)[1], offsets[s]};
  }
  return merge_inline(shards, num_shards, num_queries, k, largest, type_num);
}

// merge_small(distances, ids, k, metric, id_offsets, sorted, dedup, backend) -> (distances, ids) or None (see the
// file's comment): topk_merge's arguments as the caller passed them.
PyObject* merge_small(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "merge_small(distances, ids, k, metric, id_offsets, sorted, dedup, backend)");
    return nullptr;
  }
  PyObject *distances = args[0], *ids = args[1], *metric = args[3];
  const bool largest = is_text(metric, interned_ip, "ip");
  if (!PyLong_CheckExact(args[2]) || (args[5] != Py_True && args[5] != Py_False) || args[6] != Py_False ||
      !is_text(args[7], interned_auto, "auto") || !(largest || is_text(metric, interned_l2, "l2"))) {
    Py_RETURN_NONE;
  }
  const long long k = PyLong_AsLongLong(args[2]);
  if (k == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  if (k < 1 || k > kMaxK) Py_RETURN_NONE;
  const bool sorted = args[5] == Py_True;
  Stacked stacked;
  bool is_stacked = false;
  if (PyArray_CheckExact(distances)) {
    PyArrayObject* d = plain_rows(distances, 3, is_float);
    PyArrayObject* i = plain_rows(ids, 3, is_int64);
    if (d == nullptr || i == nullptr || !same_shape(d, i)) Py_RETURN_NONE;
    stacked = stacked_arrays(d, i);
    is_stacked = true;
  } else if (THPVariable_CheckExact(distances)) {
    if (!stacked_tensors(distances, ids, &stacked)) Py_RETURN_NONE;
    is_stacked = true;
  }
  if (is_stacked) {
    const int64_t* shape = stacked.shape;
    // At least one shard; k may exceed the candidates per query (padding), but not into a huge output.
    if (shape[0] < 1 || (k > shape[0] * shape[2] && shape[1] * k > kMaxPaddedOutput)) Py_RETURN_NONE;
    return stacked.type_num == NPY_FLOAT ? merge_stacked<float>(stacked, args[4], k, largest, sorted)
                                         : merge_stacked<double>(stacked, args[4], k, largest, sorted);
  }
  const bool listed = (PyList_CheckExact(distances) || PyTuple_CheckExact(distances)) &&
                      (PyList_CheckExact(ids) || PyTuple_CheckExact(ids)) &&
                      PySequence_Fast_GET_SIZE(distances) >= 1 &&
                      PySequence_Fast_GET_SIZE(distances) == PySequence_Fast_GET_SIZE(ids);
  if (!listed) Py_RETURN_NONE;
  PyArrayObject* first = plain_rows(PySequence_Fast_GET_ITEM(distances, 0), 2, is_float);
  if (first == nullptr) Py_RETURN_NONE;
  return PyArray_TYPE(first) == NPY_FLOAT ? merge_listed<float>(distances, ids, args[4], k, largest, sorted)
                                          : merge_listed<double>(distances, ids, args[4], k, largest, sorted);
}

PyMethodDef methods[] = {
    {"merge_small", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(merge_small)), METH_FASTCALL,
     "topk_merge's small-call path for numpy arrays and CPU tensors (see csrc/topk_merge_numpy.cpp)."},
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
