# The weights as an OCI image, for the fill Job (job.yaml): the registry you already push the
# service's images to carries them, versioned by tag, and no pod needs network access to a
# model hub. The build context is a folder with the weights' layout:
#   weights/diffusion    a diffusers folder (e.g. `hf download <repo> --local-dir ...`)
#   weights/nsfw         export/nsfw.py's output (model.onnx, nsfw.json, the CPU variants)
#   weights/huggingface  HF_HOME, what the models read from the Hugging Face cache
#   docker build -f deploy/kubernetes/weights-fill/weights.Dockerfile -t REGISTRY/imagegen-weights:2026-12 ./my-weights
# busybox gives the Job sh, cp and mv. The Job copies from /imagegen-weights.
FROM busybox:1.37.0
COPY weights/ /imagegen-weights/
