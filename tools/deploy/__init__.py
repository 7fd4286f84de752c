"""`make deploy`, `make deploy-check` and `make images`: render the kustomize overlays under
deploy/, check them offline (schemas and policies), build the image, apply to a cluster.

Run as `python -m tools.deploy {check,images,render,deploy}`; see `__main__.py`.
"""
