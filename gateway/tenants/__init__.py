"""Tenants: who a request belongs to, by its API key, and the quotas that follow the tenant."""
