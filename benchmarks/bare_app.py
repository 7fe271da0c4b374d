"""The floor for (e): a bare FastAPI app on uvicorn with one /health route, started like the gateway.

    python benchmarks/bare_app.py PORT
"""

import sys

import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
