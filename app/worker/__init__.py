"""The worker: claims queued work under leases with fencing tokens and runs each domain's tasks."""
