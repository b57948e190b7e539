"""Tests of deploy/: Compose and Kubernetes files checked by the tools that consume them, offline."""
