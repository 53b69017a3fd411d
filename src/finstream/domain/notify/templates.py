"""Message templates: one file per template, channel and locale, over shared layouts.

Layout of the ``templates/`` folder (``finstream.resources.resource("templates")``)::

    _layouts/email.j2  push.j2  sms.j2  inapp.j2     shared, one per channel
    <template>/<channel>.<locale>.j2                 e.g. price_alert/email.de.j2

A template file extends its channel's layout and fills the blocks the layout
asks for: ``subject`` (email subject, push title, in-app title), ``text``
(plain body) and, for email, optionally ``html`` (the layout derives one from
the text otherwise). The layout renders one *part* at a time (the ``part``
variable), so each part is rendered on its own.

Locales fall back from region to language to the default (``de-AT`` ->
``de`` -> ``en``). A template without a file for a channel does not offer
that channel (:class:`ChannelNotAvailable`); an unknown template, a variable
the data lacks (StrictUndefined) or anything else that fails to render is a
:class:`TemplateError` and the request is never sent half-rendered.

Templates outside the image: an *overlay* folder (``FINSTREAM_TEMPLATES_DIR``,
a ConfigMap in the chart) with the same layout overrides packaged files of
the same path and adds new ones. Every file is parsed when loaded; a file
that does not parse is refused with its path and line
(:attr:`Templates.errors`) and the last good version of that path (or the
packaged one) keeps serving. The folders are checked for changes at most
every ``reload_seconds`` (modification times and sizes), so an edited or
added template is live without a restart.

:meth:`Templates.missing_variables` renders with a recording "undefined" to
name every variable a request lacks for a channel (the API refuses such a
request before accepting it).

Rendering is sandboxed (Jinja2 ``SandboxedEnvironment``): request data is
untrusted. The email HTML part is autoescaped; text parts are not (they are
not HTML). Outputs are fitted to each channel's limits: single-line subjects,
SMS within a number of segments (GSM-7 or UCS-2), push within its payload
budget.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.runtime import new_context
from jinja2.sandbox import SandboxedEnvironment

from finstream.domain.notify.fitting import fit_sms, truncate
from finstream.domain.notify.preferences import DEFAULT_LOCALE

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_WS = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")
MAX_JSON_CHARS = 200_000

# GSM 03.38 basic set, and the extension set whose characters take two septets.


class TemplateError(Exception):
    """The request cannot be rendered; it goes to the dead-letter topic with this reason."""


class UnknownTemplate(TemplateError):
    pass


class MissingVariable(TemplateError):
    pass


class ChannelNotAvailable(Exception):
    """The template has no file for this channel: the channel is skipped, not an error."""


@dataclass(frozen=True)
class Limits:
    subject_chars: int = 200
    email_text_chars: int = 100_000
    push_title_chars: int = 100
    push_body_chars: int = 1000
    # FCM and APNs accept 4096 bytes of payload; keep room for their envelopes.
    push_payload_bytes: int = 3500
    sms_segments: int = 3
    inapp_body_chars: int = 4000


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    text: str
    html: str | None
    locale: str  # the locale whose file was used


def locale_chain(locale: str | None, default: str = DEFAULT_LOCALE) -> list[str]:
    """``de-AT`` -> [``de-AT``, ``de``, default]."""
    chain: list[str] = []
    if locale:
        chain.append(locale)
        lang = locale.split("-")[0]
        if lang not in chain:
            chain.append(lang)
    if default not in chain:
        chain.append(default)
    return chain


def _from_json(value: Any) -> Any:
    if not isinstance(value, str) or len(value) > MAX_JSON_CHARS:
        raise TemplateError("from_json needs a JSON string")
    try:
        return json.loads(value)
    except ValueError as exc:
        raise TemplateError(f"invalid JSON in template data: {exc}") from None


@dataclass(frozen=True)
class TemplateFile:
    name: str  # path relative to its folder: price_alert/email.de.j2
    path: str  # where it was read from
    source: str


@dataclass(frozen=True)
class LoadError:
    """A template file refused at load: it does not parse."""

    name: str
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


_RECORDING: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "template_missing", default=None
)


class _RecordingUndefined(jinja2.ChainableUndefined):
    """Records every use that StrictUndefined would refuse, and carries on."""

    def _record(self) -> None:
        seen = _RECORDING.get()
        if seen is not None and self._undefined_name is not None:
            seen.add(self._undefined_name)

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
        self._record()
        return self

    def __str__(self) -> str:
        self._record()
        return ""

    def __iter__(self) -> Any:
        self._record()
        return iter(())

    def __bool__(self) -> bool:
        self._record()
        return False

    def __len__(self) -> int:
        self._record()
        return 0

    __add__ = __radd__ = __mul__ = __rmul__ = __mod__ = __rmod__ = _fail_with_undefined_error
    __sub__ = __rsub__ = __truediv__ = __rtruediv__ = _fail_with_undefined_error
    __lt__ = __le__ = __gt__ = __ge__ = __int__ = __float__ = _fail_with_undefined_error
    __eq__ = __ne__ = _fail_with_undefined_error
    __hash__ = object.__hash__


def read_folder(root: Path) -> list[TemplateFile]:
    """Every ``*.j2`` under a folder (ConfigMap bookkeeping entries like ``..data`` skipped)."""
    out: list[TemplateFile] = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".j2") or filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            name = path.relative_to(root).as_posix()
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                source = f"{{% error %}} unreadable: {exc}"
            out.append(TemplateFile(name, str(path), source))
    return out


def folder_signature(roots: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """What changes when a template file is edited, added or removed (mtime and size)."""
    sig: list[tuple[str, int, int]] = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                if filename.endswith(".j2") and not filename.startswith("."):
                    try:
                        st = (Path(dirpath) / filename).stat()
                    except OSError:
                        continue
                    sig.append((f"{dirpath}/{filename}", st.st_mtime_ns, st.st_size))
    return tuple(sorted(sig))


def _env(
    loader: jinja2.BaseLoader,
    autoescape: bool,
    undefined: type[jinja2.Undefined] = jinja2.StrictUndefined,
) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        loader=loader,
        undefined=undefined,
        autoescape=autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
        # A plain dict: every file of one load is compiled at most once, and a
        # reload builds new environments. Jinja's LRU cache (any positive size)
        # takes a lock and scans its queue on every lookup, and each render
        # looks its layout up (``extends``): 6% of the router's time.
        cache_size=-1,
    )
    env.filters["from_json"] = _from_json
    return env


def _one_line(text: str) -> str:
    # CR/LF in a subject would be a header injection; a title is one line anyway.
    return _WS.sub(" ", text).strip()


class Templates:
    """Finds, renders and fits templates; compiled templates are cached.

    ``root`` holds the packaged templates; ``overlay`` (optional) overrides
    and extends them. Both are read into memory and checked for changes at
    most every ``reload_seconds`` (0: on every use; ``None``: never).
    """

    def __init__(
        self,
        root: Path,
        *,
        overlay: Path | None = None,
        default_locale: str = DEFAULT_LOCALE,
        limits: Limits | None = None,
        reload_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.overlay = overlay
        self.default_locale = default_locale
        self.limits = limits or Limits()
        self.reload_seconds = reload_seconds
        self._clock = clock
        self._good: dict[str, TemplateFile] = {}
        self.errors: list[LoadError] = []
        self.generation = 0
        self._signature: tuple[tuple[str, int, int], ...] = ()
        self._checked = clock()
        self.reload()

    # -- loading -------------------------------------------------------------------
    def _roots(self) -> list[Path]:
        return [self.root] + ([self.overlay] if self.overlay is not None else [])

    def reload(self) -> list[LoadError]:
        """Read both folders again; refuse files that do not parse (last good ones stay)."""
        self._signature = folder_signature(self._roots())
        files: dict[str, TemplateFile] = {}
        for root in self._roots():
            for f in read_folder(root):
                files[f.name] = f  # the overlay, read last, wins
        parser = _env(jinja2.DictLoader({}), autoescape=False)
        good: dict[str, TemplateFile] = {}
        errors: list[LoadError] = []
        for name, f in sorted(files.items()):
            try:
                parser.parse(f.source, name, f.path)
            except jinja2.TemplateSyntaxError as exc:
                errors.append(LoadError(name, f.path, exc.lineno, exc.message or str(exc)))
                previous = self._good.get(name)
                if previous is not None:
                    good[name] = previous
                continue
            good[name] = f
        self._good = good
        self.errors = errors
        self.generation += 1
        loader = jinja2.FunctionLoader(self._source)
        self._text = _env(loader, autoescape=False)
        self._html = _env(loader, autoescape=True)
        self._probe = _env(loader, autoescape=False, undefined=_RecordingUndefined)
        self._files: dict[tuple[str, str, str], str | None] = {}
        self._templates: dict[tuple[int, str], tuple[Any, dict[str, Any]]] = {}
        return errors

    def _source(self, name: str) -> tuple[str, str, Callable[[], bool]] | None:
        f = self._good.get(name)
        if f is None:
            return None
        generation = self.generation
        return f.source, f.path, lambda: generation == self.generation

    def maybe_reload(self) -> bool:
        """Reload when a file changed and ``reload_seconds`` have passed since the last look."""
        if self.reload_seconds is None:
            return False
        now = self._clock()
        if now - self._checked < self.reload_seconds:
            return False
        self._checked = now
        if folder_signature(self._roots()) == self._signature:
            return False
        self.reload()
        return True

    def file(self, name: str) -> TemplateFile | None:
        return self._good.get(name)

    # -- lookups ---------------------------------------------------------------------
    def names(self) -> list[str]:
        self.maybe_reload()
        return sorted(
            {n.split("/", 1)[0] for n in self._good if "/" in n and not n.startswith("_")}
        )

    def exists(self, template: str) -> bool:
        self.maybe_reload()
        return bool(_NAME.match(template)) and any(n.startswith(f"{template}/") for n in self._good)

    def channels(self, template: str) -> list[str]:
        """The channels a template has a file for (any locale)."""
        if not self.exists(template):
            raise UnknownTemplate(f"unknown template {template!r}")
        found = {
            n.split("/", 1)[1].split(".", 1)[0] for n in self._good if n.startswith(f"{template}/")
        }
        return [c for c in ("email", "push", "sms", "inapp") if c in found]

    def _file(self, template: str, channel: str, locale: str | None) -> tuple[str, str]:
        key = (template, channel, locale or "")
        if key not in self._files:
            if not self.exists(template):
                raise UnknownTemplate(f"unknown template {template!r}")
            found = None
            for loc in locale_chain(locale, self.default_locale):
                name = f"{template}/{channel}.{loc}.j2"
                if name in self._good:
                    found = f"{name}|{loc}"
                    break
            self._files[key] = found
        found = self._files[key]
        if found is None:
            raise ChannelNotAvailable(f"template {template!r} has no {channel} version")
        name, _, loc = found.partition("|")
        return name, loc

    def missing_variables(
        self, template: str, channel: str, locale: str | None, data: Mapping[str, str]
    ) -> list[str]:
        """The variables a request's data lacks for this channel (every one, sorted).

        Raises :class:`UnknownTemplate` and :class:`ChannelNotAvailable` like render.
        """
        channel = channel.lower()
        self.maybe_reload()
        name, used = self._file(template, channel, locale)
        context = {**data, "data": dict(data), "locale": used, "channel": channel}
        parts = {"sms": ("text",), "email": ("subject", "text", "html")}.get(
            channel, ("subject", "text")
        )
        seen: set[str] = set()
        token = _RECORDING.set(seen)
        try:
            for part in parts:
                try:
                    self._probe.get_template(name).render({**context, "part": part})
                except Exception:  # noqa: S112 (other failures show when rendering for real)
                    continue
        finally:
            _RECORDING.reset(token)
        return sorted(seen)

    def _compiled(self, env: SandboxedEnvironment, name: str) -> tuple[Any, dict[str, Any]]:
        """A compiled template and its globals as a plain dict, once per load."""
        key = (id(env), name)
        hit = self._templates.get(key)
        if hit is None:
            template = env.get_template(name)
            hit = self._templates[key] = (template, dict(template.globals))
        return hit

    def _render(
        self, env: SandboxedEnvironment, name: str, part: str, context: dict[str, Any]
    ) -> str:
        try:
            template, base = self._compiled(env, name)
            # Template.render would copy the globals (a ChainMap) into every
            # context and wrap the render; a router renders several parts per
            # message, so the context is built once from a plain dict here.
            # The globals go in as that dict too (the context takes their keys):
            # taking a ChainMap's keys for every part was 1-2 us of a 5-7 us
            # render, measured alone.
            ctx = new_context(
                env, template.name, template.blocks, {**base, **context, "part": part}, True, base
            )
            return "".join(template.root_render_func(ctx))
        except jinja2.UndefinedError as exc:
            raise MissingVariable(f"template {name} ({part}): {exc.message}") from None
        except TemplateError as exc:
            raise TemplateError(f"template {name} ({part}): {exc}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {name} ({part}) failed: {exc}") from None
        except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError) as exc:
            raise TemplateError(f"template {name} ({part}) failed: {exc!r}") from None

    def render(
        self,
        template: str,
        channel: str,
        locale: str | None,
        data: Mapping[str, str],
        extra: Mapping[str, Any] | None = None,
    ) -> Rendered:
        """Render every part of one channel's message, fitted to its limits."""
        channel = channel.lower()
        self.maybe_reload()
        name, used = self._file(template, channel, locale)
        # Data keys become variables; ours win over a datum of the same name
        # (the datum stays reachable as data["name"]).
        context: dict[str, Any] = {
            **data,
            **(extra or {}),
            "data": dict(data),
            "locale": used,
            "channel": channel,
        }
        limits = self.limits
        if channel == "sms":
            text = self._render(self._text, name, "text", context).strip()
            return Rendered(
                None, fit_sms(_BLANK_LINES.sub("\n\n", text), limits.sms_segments), None, used
            )
        subject = _one_line(self._render(self._text, name, "subject", context))
        text = _BLANK_LINES.sub("\n\n", self._render(self._text, name, "text", context).strip())
        if not text:
            raise TemplateError(f"template {name} renders an empty body")
        if channel == "email":
            html = self._render(self._html, name, "html", context).strip()
            return Rendered(
                truncate(subject, limits.subject_chars) or None,
                truncate(text, limits.email_text_chars),
                html or None,
                used,
            )
        if channel == "push":
            title = truncate(subject, limits.push_title_chars) or None
            return Rendered(title, truncate(text, limits.push_body_chars), None, used)
        return Rendered(
            truncate(subject, limits.subject_chars) or None,
            truncate(text, limits.inapp_body_chars),
            None,
            used,
        )
