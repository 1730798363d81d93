"""The pipeline under LitServe 0.2.19, batching as its docs show: `max_batch_size` and
`batch_timeout` on the LitAPI, `predict` taking the batch, the JPEG made per request in
`encode_response`.

    python -m benchmarks.peers.litserve_app PORT
"""

from __future__ import annotations

import sys
from typing import Any

import litserve as ls

from benchmarks.peers import pipeline


class Diffusion(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.pipe = pipeline.load()

    # No annotation on `request`: LitServe builds its endpoint from it, and reads an unannotated
    # one as the JSON body.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return request

    def predict(self, batch: list[dict[str, Any]]) -> list[Any]:
        return pipeline.images(self.pipe, batch)

    def encode_response(self, image: Any) -> dict[str, str]:
        return pipeline.answer(image)


def main() -> None:
    api = Diffusion(max_batch_size=pipeline.max_batch_size(),
                    batch_timeout=pipeline.batch_timeout_s(), api_path="/generate")
    # A large image at 8 clients outlasts the default 30 s request timeout.
    server = ls.LitServer(api, accelerator="cpu", timeout=600)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
