"""Asynchronous generation: jobs on Redis, run by workers, announced by signed webhooks."""
