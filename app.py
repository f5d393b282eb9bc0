"""Draw the hole, watch Algorithm 1 run: a local web page around the code of inpaint.py.

    python app.py                          # loads the models once, then: open http://127.0.0.1:8000
    python app.py --weights sd14/ --port 8080
    python app.py --host 0.0.0.0           # the network too: prints the address with its token

The page (app.html) sends a photo, the mask painted on it and the options. The server runs
`inpaint_tensors` on them, as inpaint.py does, and streams every step's previews of z_{0|t} and
ẑ_{0|t} as server-sent events, then the result as a PNG: the very file `python inpaint.py` writes
for the same image, mask and options. One run at a time, and it belongs to the page that started
it: when that page stops reading (reloaded, closed), the run stops after its current step.
With the method blend (`ldm_min.blend`), the blended z_{t-1} is previewed in the place of ẑ_{0|t}.

Only the page itself can drive the server: requests to another Host (DNS rebinding) are refused,
and so are runs and cancels sent by other web sites. Beyond loopback every request needs a token,
as Jupyter's: made at start and printed in the address, or set with --token.
"""
import argparse
import base64
import gc
import io
import ipaddress
import json
import queue
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import inpaint
from ldm_min import InputError, LdmMinError, Options, images, region
from ldm_min.images import LATENT_MASK_RULES
from ldm_min.options import LATENT_METHODS
from ldm_min.region import REGIONS
from ldm_min.pipeline import inpaint_tensors

PAGE = Path(__file__).with_name("app.html")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")  # the names this machine has for itself in a Host header
ANY_ADDRESS = ("0.0.0.0", "::", "")             # listening on every address: the machine's every name


def token(text):
    """--token: it travels in an address and a cookie, so it keeps to characters neither escapes."""
    if not re.fullmatch(r"[A-Za-z0-9._~-]+", text):
        raise argparse.ArgumentTypeError("a token is letters, digits and . _ ~ - only")
    return text


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_args(argv=None):
    p = inpaint.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only; "
                                                       "any other needs the token)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--token", type=token, help="the secret every request must carry (default: a random one when "
                                               "--host is not a loopback address, printed in the address to open)")
    p.add_argument("--max-upload", type=int, default=50, help="MiB a request may send, photo and mask together "
                                                              "(default %(default)s)")
    p.add_argument("--captioner", help="for the prompt auto: as inpaint.py's --captioner")
    inpaint.add_model_options(p)
    p.set_defaults(quiet=True)  # inpaint.auto_prompt prints the caption unless quiet: the page shows it
    args = p.parse_args(argv)
    if not 0 < args.port < 2**16:
        p.error(f"--port must be from 1 to {2**16 - 1}, got {args.port}")
    if args.max_upload < 1:
        p.error(f"--max-upload must be at least 1 (MiB), got {args.max_upload}")
    if args.token is None and not is_loopback(args.host):
        args.token = secrets.token_hex(24)  # Jupyter's length: 192 random bits, made at each start
    return args


def address(args):
    """The address to open, with the token when there is one (as Jupyter prints it)."""
    host = socket.gethostname() if args.host in ANY_ADDRESS else args.host
    return f"http://{bracketed(host)}:{args.port}" + (f"/?token={args.token}" if args.token else "")


def bracketed(host):
    """An IPv6 address as a URL and a Host header write it."""
    return f"[{host}]" if ":" in host else host


def hosts(args):
    """The Host headers a request may carry: the listening address with its port (on loopback, any of
    this machine's names for itself). None, any, when listening on every address: the token guards."""
    if args.host in ANY_ADDRESS:
        return None
    names = {bracketed(args.host), *(LOOPBACK if is_loopback(args.host) else ())}
    return {f"{name}:{args.port}" for name in names} | (names if args.port == 80 else set())  # :80 goes unsaid


def refusal(request, hosts, token, cookie):
    """Why a request may not reach the server, or None.

    - Host: a page of another site whose name was rebound to this machine's address (DNS
      rebinding) sends its own name; only the server's own address passes.
    - The token, beyond loopback: in the address (?token=) or the cookie the page got with it.
    - A request that changes something (a run, a cancel) from a page of another origin: a browser
      sends any site's form POST to 127.0.0.1, and CORS only hides the answer. Its Origin or its
      Sec-Fetch-Site says so (as ComfyUI's origin middleware checks); curl and scripts send
      neither, and pass.
    """
    host = request.headers.get("host", "")
    if hosts is not None and host not in hosts:
        return f"Host {host!r} is not this server's address ({', '.join(sorted(hosts))})"
    if token and not any(secrets.compare_digest(given.encode(), token.encode())
                         for given in (request.query_params.get("token"), request.cookies.get(cookie)) if given):
        return "this server needs its token: open the address it printed at start (.../?token=...)"
    if request.method not in ("GET", "HEAD"):
        origin, site = request.headers.get("origin"), request.headers.get("sec-fetch-site")
        if origin is not None and origin != f"http://{host}":
            return f"only this server's own page may run or cancel, not a page of {origin}"
        if site not in (None, "same-origin"):
            return f"only this server's own page may run or cancel, not a {site} page"
    return None


def guard(app, hosts, token, cookie):
    """The ASGI middleware that holds every request to `refusal`: refused ones get 403 and its reason."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def gate(scope, receive, send):
        if scope["type"] == "http" and (reason := refusal(Request(scope), hosts, token, cookie)):
            return await JSONResponse({"detail": reason}, 403)(scope, receive, send)
        await app(scope, receive, send)
    return gate


@torch.no_grad()
def fit_preview(models, n=4, side=64):
    """A (5, 3) matrix P: rgb = [z, 1] @ P per latent pixel, the page's cheap preview of a latent.

    SD's latent channels are close to a linear map of colour, so a 4x3 matrix and a bias preview
    a latent for almost nothing, where the decoder would cost a step's time (A1111 and ComfyUI
    ship such a matrix for SD v1.x). It is fitted here on the VAE at hand, so it suits any
    checkpoint: least squares from latents to the decoder's output for them, averaged over each
    latent pixel's 8x8 cell. The latents: E(x) of a few smooth random colour pictures, and as many
    N(0, I) draws, which span all 4 channels where the E(x) of 3-channel pictures may nearly not.
    Fixed seed: the same map at every start."""
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(side, side), mode="bilinear")
    z = torch.cat([models.vae.encode(x.to(models.device, models.dtype)).float(),
                   torch.randn(n, 4, side // 8, side // 8, generator=g).to(models.device)])
    rgb = F.avg_pool2d(models.vae.decode(z.to(models.dtype)).float(), 8)
    z1 = torch.cat([z, torch.ones_like(z[:, :1])], 1)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).cpu()
    return torch.linalg.lstsq(rows(z1), rows(rgb)).solution


def preview(z, P):
    """A latent (1, 4, h, w) as an h x w PNG data URL, through P: the page scales it up."""
    z1 = torch.cat([z, torch.ones_like(z[:, :1])], 1).cpu()
    return data_url(images.to_pil(torch.einsum("bchw,cd->bdhw", z1, P)))


def data_url(image):
    """A PIL image as a PNG data URL: written as inpaint.py writes its output (jobs.save_atomically)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Cancelled(Exception):
    """Raised from the step callback when Cancel is pressed: sampling stops between two steps."""


class Upload(io.BytesIO):
    """The bytes of an uploaded file, named in messages by the file's own name: never a path here."""

    def __init__(self, data, name):
        super().__init__(data)
        self.label = Path(name or "upload").name

    def __str__(self):
        return self.label


def option(field, text):
    """A form field as the type Options declares for it; anything else is an InputError."""
    if field.type is bool:
        return text == "true"
    try:
        return field.type(text)
    except ValueError:
        kind = "a whole number" if field.type is int else "a number"
        raise InputError(f"{field.name.replace('_', ' ')} must be {kind}, got {text!r}") from None


def latent_grid(hole, options):
    """M_l as rows of '0' (hole) and '1' (known), for the page's 8x8 grid; None when the image is
    inpainted in a crop at the model's scale (region auto), where M_l lies on the crop's grid."""
    if region.box_for(hole, options):
        return None
    M_l = images.latent_known_mask(images.pad_to_8(hole, hole)[1], options.dilate, options.latent_mask)
    return ["".join(str(int(v)) for v in row) for row in M_l[0, 0].tolist()]


def make_app(models, args):
    """The server: the page, its routes, behind `guard`."""
    from anyio import to_thread
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, StreamingResponse
    from starlette.background import BackgroundTask

    app = FastAPI()
    P = fit_preview(models)
    busy = threading.Lock()  # one run at a time: held from the request until its worker ends
    running = {}             # the run in progress: its cancel event, its step and steps
    cookie = f"ldm_min_token_{args.port}"  # browsers share a cookie between ports: one name per server

    async def read_run(request):
        """The photo, its hole and the Options of a /run request, checked before anything runs."""
        size = request.headers.get("content-length")  # the server reads exactly this many bytes
        if size is None:
            raise HTTPException(411, "the request must say its length")
        if int(size) > args.max_upload * 2**20:
            raise HTTPException(413, f"the upload is {int(size) / 2**20:.1f} MiB: over the {args.max_upload} MiB limit "
                                     f"(--max-upload)")
        form = await request.form(max_files=2, max_fields=len(fields(Options)))
        try:
            files = [form.get(name) for name in ("image", "mask")]
            if any(isinstance(f, str) or f is None for f in files):
                raise InputError("the request must send an image file and a mask file")
            image, mask = [images.open_image(Upload(await f.read(), f.filename), what)
                           for f, what in zip(files, ("image", "mask"))]
            options = Options(**{f.name: option(f, form[f.name]) for f in fields(Options) if f.name in form})
            return (*images.prepare(image, mask, options.invert_mask), options)
        except InputError as e:
            raise HTTPException(400, str(e)) from None

    def work(x, hole, options, cancel, events):
        """One run, in a thread of its own: its warnings, steps and result (or error) onto `events`."""
        send = lambda name, **data: events.put(f"event: {name}\ndata: {json.dumps(data)}\n\n")

        def step(i, t, z, z0, z0_hat):
            if cancel.is_set():
                raise Cancelled
            running["step"] = i + 1
            send("step", i=i, t=int(t), steps=options.steps, seconds=(time.perf_counter() - start) / (i + 1),
                 z0=preview(z0, P), z0_hat=preview(z0_hat, P))

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # each run shows its own warnings, not just the first run's
                warnings.showwarning = lambda message, *_: send("warning", message=str(message))
                send("start", steps=options.steps, method=options.method, grid=latent_grid(hole, options))
                if options.prompt == "auto":
                    options = replace(options, prompt=inpaint.auto_prompt(x, hole, args))
                    send("caption", prompt=options.prompt)
                start = time.perf_counter()
                result = inpaint_tensors(x, hole, models, options, step)
            send("done", png=data_url(images.to_pil(result)))
        except Cancelled:
            send("cancelled")
        except LdmMinError as e:
            send("error", message=str(e))
        except (MemoryError, torch.cuda.OutOfMemoryError):
            send("error", message=inpaint.OUT_OF_MEMORY)
        except Exception as e:  # a bug: the page says so, the server keeps running
            traceback.print_exc()
            send("error", message=f"internal error ({e!r}): the server's log has the details")
        finally:
            running.clear()
            gc.collect()  # memory back to its level between runs
            if models.device.type == "cuda":
                torch.cuda.empty_cache()
            busy.release()  # before the stream ends: a page that starts its next run at once is not told busy
            events.put(None)

    async def stream(events, cancel):
        """The run's events as they come. When its page stops reading (reloaded, closed, gone), the
        server cancels this: the run stops after its current step, and its memory is freed."""
        try:
            while (event := await to_thread.run_sync(events.get, abandon_on_cancel=True)) is not None:
                yield event
        finally:
            cancel.set()

    @app.get("/")
    def page():
        """The page; opened at the printed address, it keeps the token as a cookie for its requests."""
        response = FileResponse(PAGE)
        if args.token:
            response.set_cookie(cookie, args.token, httponly=True, samesite="strict")
        return response

    @app.get("/options")
    def options():
        """Options()'s defaults, the paper's, and the choices of its choices: the page's form starts from them."""
        return {"defaults": asdict(Options()),
                "choices": {"method": LATENT_METHODS, "latent_mask": LATENT_MASK_RULES, "region": REGIONS}}

    @app.post("/run")
    async def run(request: Request):
        """Server-sent events: start, warning, caption, step (every step), then done, cancelled or error."""
        x, hole, options = await read_run(request)
        if not busy.acquire(blocking=False):
            raise HTTPException(409, "busy: another run is in progress; wait for it to end or cancel it")
        cancel, events = threading.Event(), queue.Queue()
        running.update(cancel=cancel, step=0, steps=options.steps)
        threading.Thread(target=work, args=(x, hole, options, cancel, events), name="ldm_min run", daemon=True).start()
        # A page gone before its stream began never runs the stream's code: the task after the
        # response, which a server runs once the client has gone, tells that run too.
        return StreamingResponse(stream(events, cancel), media_type="text/event-stream",
                                 background=BackgroundTask(cancel.set))

    @app.get("/status")
    def status():
        """The run in progress, for a page opened during it: steps done, of how many, and whether it
        is stopping."""
        run = dict(running)  # as it is now: its worker clears it when it ends
        if not run:
            return {"running": False}
        return {"running": True, "step": run["step"], "steps": run["steps"], "cancelling": run["cancel"].is_set()}

    @app.post("/cancel")
    def cancel():
        """Stop the run in progress after its current step."""
        event = running.get("cancel")
        if event:
            event.set()
        return {"cancelling": event is not None}

    return guard(app, hosts(args), args.token, cookie)


def listen(host, port):
    """The server's socket, bound before the models load: a port in use costs no wait."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise InputError(f"--host/--port: {e.strerror or e}") from None


def main(argv=None):
    args = parse_args(argv)
    import uvicorn

    from weights import load_models

    sock = listen(args.host, args.port)
    models = load_models(args.weights, args.device, args.dtype, args.compile, args.tokenizer)
    app = make_app(models, args)
    with tempfile.TemporaryDirectory(prefix="ldm_min_app_") as folder:
        tempfile.tempdir = folder  # where the form parser spools big uploads: removed at exit
        print(f"open {address(args)} (Ctrl-C stops)", file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    inpaint.run(main=main, interrupted="stopped")
