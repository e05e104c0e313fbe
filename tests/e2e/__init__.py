"""End-to-end tests: each starts visiontune (or a server, torchrun, a browser) as a process."""
