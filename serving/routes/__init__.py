"""The app's routes, one module per concern; ROUTERS is what create_app mounts."""

from serving.routes import captioned, hf, page, predict, share, status

ROUTERS = (status.router, predict.router, captioned.router, hf.router, page.router, share.router)
