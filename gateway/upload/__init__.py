"""The upload: the URL the client sent (`urls`), where it may connect (`egress`), the PUT with
its retries (`uploader`)."""
