# Triton for the imagegen models: NGC's tritonserver 24.10 (Triton 2.51.0, the version of the
# binary the tests run through nvidia-pytriton) plus what the Python-backend models import.
# Build context: the repository root (docker-compose.yml sets it).
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# The backend stub runs this image's python3 (3.10); pip picks the newest releases that still
# support it. torch comes alone from PyTorch's CUDA 12.6 index, the CUDA of this image (PyPI's
# default torch wheels may want a newer driver); numpy<2 because the 2.51 stub crashes on
# string tensors with numpy 2.
RUN python3 -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu126 \
        "torch>=2.6" \
 && python3 -m pip install --no-cache-dir \
        "numpy<2" "diffusers>=0.30" "transformers>=5" "safetensors" "huggingface-hub" \
        "onnxruntime-gpu>=1.18" "openvino>=2025.4,<2027" "pillow>=10"

COPY deploy/docker/set_instances.py deploy/docker/triton-entrypoint.sh embedded/drain.py /opt/imagegen/
# The models' half of the tensor contract, which every model imports: beside the packages
# installed above, where the backend stub's python3 finds it whatever repository is mounted (the
# serving copy holds only the model folders). The build stops if python3 does not find it there.
COPY imagegen_contract.py /usr/local/lib/python3.10/dist-packages/
RUN python3 -c "import imagegen_contract"
# The repository is mounted at /models (docker-compose.yml); this copy serves when it is not.
COPY model_repository /models
ENTRYPOINT ["/opt/imagegen/triton-entrypoint.sh"]
