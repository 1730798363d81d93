"""NVIDIA's hosted APIs: the transport with the bearer key (`api`), the asset upload for inputs
too large to send inline (`assets`), and the deepfake check built on both (`deepfake`)."""
