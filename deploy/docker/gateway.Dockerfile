# The gateway: Flask under gunicorn, configured only by GATEWAY_* variables (docs/settings.md).
# Build context: the repository root (docker-compose.yml sets it).
FROM python:3.11-slim

COPY deploy/docker/gateway-requirements.txt /tmp/requirements.txt
RUN python -m pip install --no-cache-dir -r /tmp/requirements.txt \
 && useradd --system --no-create-home --shell /usr/sbin/nologin gateway

COPY gateway /app/gateway
# The models' half of the tensor contract (gateway/triton/contract.py takes its names from it).
COPY imagegen_contract.py /app/
WORKDIR /app
ENV PYTHONPATH=/app PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8080
# Secret settings from files (/run/secrets) into the command's environment: the script says
# which. The job worker runs from this image too, with its own CMD (python -m gateway.jobs.worker).
COPY deploy/docker/gateway-entrypoint.sh /usr/local/bin/gateway-entrypoint.sh
USER gateway
EXPOSE 8080
ENTRYPOINT ["sh", "/usr/local/bin/gateway-entrypoint.sh"]
# gunicorn.conf.py reads bind, workers and threads from the same settings, and sets up the
# shared metrics directory when there are several workers.
CMD ["python", "-m", "gunicorn", "--config", "gateway/gunicorn.conf.py", "gateway:create_app()"]
