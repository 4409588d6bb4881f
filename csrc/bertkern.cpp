// The bertkern._C extension module: an empty Python module whose import loads this shared library,
// and with it every op that csrc/*.cu registers into the torch.ops.bertkern_cuda namespace (each
// file has its own TORCH_LIBRARY_FRAGMENT, so adding an op never edits a shared file). No pybind11:
// the ops are reached through torch.ops, which keeps this file and the build light.
#include <Python.h>

#include <cuda.h>  // CUDA_VERSION of the toolkit this was compiled with
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>

// setup.py passes the TORCH_CUDA_ARCH_LIST it built for, e.g. "8.0;9.0".
#ifndef BERTKERN_CUDA_ARCHS
#define BERTKERN_CUDA_ARCHS "unknown"
#endif

namespace {

// "archs=8.0;9.0 cuda=13.0 torch=2.14.1": what this binary was built for, so `bertkern info` can
// say so and a stale build (other torch, missing arch) is easy to spot.
std::string build_info() {
  return std::string("archs=") + BERTKERN_CUDA_ARCHS + " cuda=" + std::to_string(CUDA_VERSION / 1000) + "." +
         std::to_string(CUDA_VERSION % 1000 / 10) + " torch=" + std::to_string(TORCH_VERSION_MAJOR) + "." +
         std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bertkern_cuda, m) {
  // No tensor arguments, so one catch-all kernel serves every device (and works without a GPU).
  m.def("build_info() -> str", &build_info);
}

// `import bertkern._C` calls this. The module itself is empty: the static initializers of the
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks ran when the library was loaded.
// PyMODINIT_FUNC gives C linkage and default visibility.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                     // name (the package prefix is added on import)
      "bertkern CUDA kernels, registered as torch.ops.bertkern_cuda.*",  // doc
      -1,                                                       // no per-interpreter state
      nullptr,                                                  // no methods
  };
  return PyModule_Create(&module_def);
}
