import os

# The Triton interpreter must be switched on before the first @triton.jit function is defined,
# so it is set here, before any test module imports minikv.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
