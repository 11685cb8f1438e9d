"""HTTP plumbing shared by the services: JSON responses, errors, middleware, the Hypercorn runner."""
