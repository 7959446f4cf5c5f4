// The Python module karma_kernels._C, and its one function: the small-call path of topk_merge for numpy.
//
// Importing the module registers the torch ops (the TORCH_LIBRARY blocks of the other files). merge_numpy
// merges a stacked (S, Q, W) float32/float64 array straight from the numpy buffers into preallocated outputs:
// at one query per call (the serving case) the op's own path spends most of its time building tensors and
// dispatching, not merging. It takes only what needs no checks beyond the buffers' (no id offsets, no dedup,
// rows contiguous) and answers False for anything else, or when sorted=True meets a row out of order; the
// Python wrapper then takes the op's path, which raises the op's errors.
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace karma {
template <typename scalar_t>
bool merge_stacked_rows(const scalar_t* distances, const int64_t* ids, int64_t num_shards, int64_t num_queries,
                        int64_t width, const int64_t distance_strides[2], const int64_t id_strides[2], int64_t k,
                        bool largest, bool sorted, scalar_t* out_distances, int64_t* out_ids);
}  // namespace karma

namespace {

// A buffer view, released when it goes out of scope.
class BufferView {
 public:
  BufferView() = default;
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  ~BufferView() {
    if (held_) PyBuffer_Release(&buffer_);
  }
  bool acquire(PyObject* object, int flags, int ndim) {
    held_ = PyObject_GetBuffer(object, &buffer_, flags) == 0;
    if (!held_) PyErr_Clear();
    return held_ && buffer_.ndim == ndim;
  }
  // 'f' float32, 'd' float64, 'i' int64 ("l"/"q" with 8 bytes), 0 otherwise.
  char kind() const {
    const char* f = buffer_.format;
    if (f == nullptr || f[0] == '\0' || f[1] != '\0') return 0;
    if (f[0] == 'f' && buffer_.itemsize == 4) return 'f';
    if (f[0] == 'd' && buffer_.itemsize == 8) return 'd';
    if ((f[0] == 'l' || f[0] == 'q') && buffer_.itemsize == 8) return 'i';
    return 0;
  }
  int64_t size(int d) const { return buffer_.shape[d]; }
  // Stride of dimension d in elements, or kNotWhole when it is not a whole number of them.
  static constexpr int64_t kNotWhole = INT64_MIN;
  int64_t stride(int d) const {
    const Py_ssize_t bytes = buffer_.strides[d];
    return bytes % buffer_.itemsize == 0 ? bytes / buffer_.itemsize : kNotWhole;
  }
  void* data() const { return buffer_.buf; }

 private:
  Py_buffer buffer_{};
  bool held_ = false;
};

template <typename scalar_t>
bool merge(const BufferView& d, const BufferView& i, int64_t k, bool largest, bool sorted, const BufferView& out_d,
           const BufferView& out_i) {
  const int64_t distance_strides[2] = {d.stride(0), d.stride(1)};
  const int64_t id_strides[2] = {i.stride(0), i.stride(1)};
  bool merged = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    merged = karma::merge_stacked_rows<scalar_t>(
        static_cast<const scalar_t*>(d.data()), static_cast<const int64_t*>(i.data()), d.size(0), d.size(1),
        d.size(2), distance_strides, id_strides, k, largest, sorted, static_cast<scalar_t*>(out_d.data()),
        static_cast<int64_t*>(out_i.data()));
  } catch (const std::exception&) {
    merged = false;  // the op's path raises it with the op's message
  }
  Py_END_ALLOW_THREADS
  return merged;
}

// merge_numpy(distances, ids, k, largest, sorted, out_distances, out_ids) -> bool (see the file's comment).
PyObject* merge_numpy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "merge_numpy(distances, ids, k, largest, sorted, out_distances, out_ids)");
    return nullptr;
  }
  const long long k = PyLong_AsLongLong(args[2]);
  if (k == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  const int largest = PyObject_IsTrue(args[3]);
  const int sorted = PyObject_IsTrue(args[4]);
  BufferView d, i, out_d, out_i;
  if (k < 1 || largest < 0 || sorted < 0 || !d.acquire(args[0], PyBUF_STRIDES | PyBUF_FORMAT, 3) ||
      !i.acquire(args[1], PyBUF_STRIDES | PyBUF_FORMAT, 3) ||
      !out_d.acquire(args[5], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT, 2) ||
      !out_i.acquire(args[6], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT, 2)) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  const char kind = d.kind();
  bool fits = (kind == 'f' || kind == 'd') && i.kind() == 'i' && out_d.kind() == kind && out_i.kind() == 'i' &&
              d.size(0) >= 1;
  for (int dim = 0; fits && dim < 3; ++dim) {
    fits = d.size(dim) == i.size(dim) && d.stride(dim) != BufferView::kNotWhole && i.stride(dim) != BufferView::kNotWhole;
  }
  fits = fits && (d.size(2) <= 1 || (d.stride(2) == 1 && i.stride(2) == 1)) && out_d.size(0) == d.size(1) &&
         out_d.size(1) == k && out_i.size(0) == d.size(1) && out_i.size(1) == k;
  if (!fits) Py_RETURN_FALSE;
  const bool merged = kind == 'f' ? merge<float>(d, i, k, largest, sorted, out_d, out_i)
                                  : merge<double>(d, i, k, largest, sorted, out_d, out_i);
  if (merged) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"merge_numpy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(merge_numpy)), METH_FASTCALL,
     "topk_merge's small-call path for stacked numpy arrays (see csrc/topk_merge_numpy.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
