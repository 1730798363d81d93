"""The same demo pipeline served by LitServe, Ray Serve and BentoML, beside the service."""
