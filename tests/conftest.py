import os

# Mesh tests need several devices; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".bfcl_root"))
os.makedirs(os.environ["BFCL_PROJECT_ROOT"], exist_ok=True)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
