"""The pages a person sees in a browser: unsubscribe, its confirmation and undo, and bad links.

A person who clicks a link in an email lands here, often on a phone: each page is
one small HTML document in the sender's brand (the playbook's ``brand``), fluid to
320 px, with styles inline in one ``<style>`` block and no script, image or outside
resource. Every value is escaped. Machines get JSON from the API, never these.

Pure: strings in, a string out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True, slots=True)
class PageBrand:
    """Whose pages these are: the playbook's brand ("" when the playbook cannot be read)."""

    name: str = ""
    website: str | None = None


@dataclass(frozen=True, slots=True)
class Button:
    """A form with one button that POSTs to ``action`` (a path of this site)."""

    action: str
    label: str
    quiet: bool = False  # drawn as a secondary action


_STYLE = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2933;font:16px/1.6 Helvetica,Arial,sans-serif;
-webkit-text-size-adjust:100%;overflow-wrap:anywhere;word-break:break-word}
main{max-width:560px;margin:0 auto;padding:32px 16px}
.card{background:#fff;border-radius:8px;padding:24px}
.brand{margin:0 0 16px;font-weight:bold;font-size:18px;color:#3b5bdb}
h1{margin:0 0 12px;font-size:24px;line-height:1.3}
p{margin:0 0 12px}
form{margin:20px 0 0}
button{font:inherit;font-weight:bold;width:100%;max-width:320px;padding:12px 20px;border:0;border-radius:6px;
background:#3b5bdb;color:#fff;cursor:pointer}
button.quiet{background:#fff;color:#3b5bdb;border:1px solid #3b5bdb}
footer{padding:16px 8px;font-size:13px;color:#7b8794;text-align:center}
footer a{color:#7b8794}
"""


def page(brand: PageBrand, *, title: str, paragraphs: Sequence[str], buttons: Sequence[Button] = ()) -> str:
    """One branded page: the brand, a title, some paragraphs (plain text) and its buttons."""
    name = brand.name or "Email preferences"
    body = "".join(f"<p>{escape(text)}</p>" for text in paragraphs)
    for button in buttons:
        quiet = ' class="quiet"' if button.quiet else ""
        body += (
            f'<form method=post action="{escape(button.action)}">'
            f"<button type=submit{quiet}>{escape(button.label)}</button></form>"
        )
    footer = (
        f'<footer><a href="{escape(brand.website)}">{escape(brand.website)}</a></footer>'
        if brand.website and brand.website.startswith(("https://", "http://"))
        else ""
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{escape(title)} · {escape(name)}</title><style>{_STYLE}</style></head>"
        f'<body><main><div class="card"><p class="brand">{escape(name)}</p>'
        f"<h1>{escape(title)}</h1>{body}</div>{footer}</main></body></html>"
    )


def _from(brand: PageBrand) -> str:
    return f"from {brand.name}" if brand.name else "from us"


def confirm_page(brand: PageBrand, *, action: str, expired_after_days: int | None, series: str | None) -> str:
    """The page an unsubscribe link opens: nothing changes until a button is pressed (scanners open links).

    With ``series`` (a path), a lighter choice too: stop only the emails planned now.
    """
    paragraphs = [f"Press the button to stop all emails {_from(brand)} to this address."]
    if expired_after_days is not None:
        paragraphs.insert(0, f"This link is from an email more than {expired_after_days} days old, and it still works.")
    buttons = [Button(action, "Unsubscribe")]
    if series is not None:
        paragraphs.append("Or stop only the series of emails you are getting now, and stay on the list for later news.")
        buttons.append(Button(series, "Only stop this series", quiet=True))
    return page(brand, title="Unsubscribe", paragraphs=paragraphs, buttons=buttons)


def unsubscribed_page(brand: PageBrand, *, undo: str | None) -> str:
    """Done; with ``undo`` (a path), a way back for whoever pressed it by mistake."""
    paragraphs = [f"You will not receive any more emails {_from(brand)}."]
    buttons = []
    if undo is not None:
        paragraphs.append("Unsubscribed by mistake? You can undo it.")
        buttons.append(Button(undo, "Subscribe again", quiet=True))
    return page(brand, title="You are unsubscribed", paragraphs=paragraphs, buttons=buttons)


def series_stopped_page(brand: PageBrand, *, unsubscribe: str) -> str:
    """The series is stopped; unsubscribing from everything stays one press away."""
    return page(
        brand,
        title="This series is stopped",
        paragraphs=[
            "The emails that were planned for you are cancelled.",
            f"You are still on the list: {brand.name or 'we'} may write again when there is something new. "
            "To stop every email, unsubscribe.",
        ],
        buttons=[Button(unsubscribe, "Unsubscribe from all emails", quiet=True)],
    )


def preview_link_page(brand: PageBrand) -> str:
    """The unsubscribe link of a preview or a test email: it works, and changes nothing."""
    return page(
        brand,
        title="This is a preview",
        paragraphs=[
            "This unsubscribe link comes from a preview or a test email, so it changes nothing: "
            "no address was unsubscribed.",
            "In the emails your leads receive, this link opens the page that unsubscribes them.",
        ],
    )


def resubscribed_page(brand: PageBrand) -> str:
    return page(
        brand,
        title="You are subscribed again",
        paragraphs=[
            f"Emails {_from(brand)} may reach this address again. "
            "The ones that were planned when you unsubscribed stay cancelled.",
        ],
    )


def cannot_undo_page(brand: PageBrand) -> str:
    return page(
        brand,
        title="This address stays unsubscribed",
        paragraphs=[
            "It was not unsubscribed with this link (or the link is too old to undo it), "
            "so it cannot be subscribed again from here.",
            "To hear from us again, reply to one of our emails.",
        ],
    )


def invalid_link_page(brand: PageBrand) -> str:
    return page(
        brand,
        title="This link does not work",
        paragraphs=[
            "This unsubscribe link is not valid: it may have been cut short (some mail programs "
            "break long links), or it was made for another address.",
            "To stop our emails, use the unsubscribe link in the most recent email "
            f"{_from(brand)}, or reply to it and ask.",
        ],
    )


def not_found_page(brand: PageBrand) -> str:
    return page(brand, title="Page not found", paragraphs=["There is nothing at this address."])


def error_page(brand: PageBrand, *, status: int, detail: str) -> str:
    """Any other error a browser meets (a wrong method, a busy database): what happened, in a line."""
    if status == 503:
        return page(
            brand,
            title="Please try again in a minute",
            paragraphs=["We could not record your request just now, and nothing was changed."],
        )
    return page(brand, title="Something is wrong with this request", paragraphs=[detail])
