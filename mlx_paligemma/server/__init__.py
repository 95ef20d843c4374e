"""`paligemma serve`: an OpenAI-compatible HTTP API, task endpoints that return data (boxes, masks)
and a web page, on one loaded model.

    config     the server's settings and limits (ServerConfig)
    inputs     request bodies -> checked work (image, prompt, SamplingParams), or an ApiError
    batcher    a queue that runs waiting requests together through Model.stream_batch
    app        the Starlette application: routes, auth, body limits, JSON errors, SSE streams
    command    the command line (`paligemma serve`), which runs the app under uvicorn
    static/    the web page at `/` (plain HTML, CSS and JavaScript: no build step, no CDN)

Starlette and uvicorn are imported only here (the `serve` extra), never by the core.
"""
