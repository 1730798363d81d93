# Triton for the imagegen models: NGC's tritonserver 26.11 (Triton 2.75.0), the current release
# when it was chosen (2026-12), well past 25.07, the first with the fixes of NVIDIA's August 2025
# bulletin (docs/security.md, "Triton releases"). The embedded stack's binary stays 2.51.0.
# Build context: the repository root (docker-compose.yml sets it).
FROM nvcr.io/nvidia/tritonserver:26.11-py3

# The backend stub runs this image's python3 (3.12 on Ubuntu 24.04), whose packages are
# externally managed (PEP 668): pip installs into them only with --break-system-packages. PyPI's
# Linux wheels of torch and onnxruntime-gpu are built for CUDA 13, the CUDA of this image, so
# nothing comes from another index. numpy<2 because the 2.51 stub crashed on string tensors
# with numpy 2 (docs/models.md); no newer stub was checked against numpy 2.
RUN python3 -m pip install --no-cache-dir --break-system-packages \
        "torch>=2.9" "numpy<2" "diffusers>=0.30" "transformers>=5" "safetensors" \
        "huggingface-hub" "onnxruntime-gpu>=1.23" "openvino>=2025.4,<2027" "pillow>=10"

COPY deploy/docker/set_instances.py deploy/docker/triton-entrypoint.sh embedded/drain.py /opt/imagegen/
# The models' half of the tensor contract, which every model imports: beside the packages
# installed above, wherever this python3 keeps them (the serving copy of the repository holds
# only the model folders). The build stops if python3 does not find it there.
COPY imagegen_contract.py /opt/imagegen/
RUN cp /opt/imagegen/imagegen_contract.py \
        "$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/" \
 && python3 -c "import imagegen_contract"
# The repository is mounted at /models (docker-compose.yml); this copy serves when it is not.
COPY model_repository /models
# triton-server, the user the NGC image creates with uid/gid 1000 (the uid NVIDIA's chart and
# deploy/kubernetes run it as); numeric, so that Kubernetes' runAsNonRoot can check it. HOME is
# the writable /tmp: the user has no home folder, and torch and Hugging Face write caches there.
USER 1000:1000
ENV HOME=/tmp
ENTRYPOINT ["/opt/imagegen/triton-entrypoint.sh"]
