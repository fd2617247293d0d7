"""The web chat page in headless Chromium (Debian's package, which `make test` installs), driven by Playwright:
a message sent from the page comes back as the model's streamed reply; a new chat clears it."""

from __future__ import annotations

import shutil

import pytest
from serving import HELLO, HELLO_REPLY, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium started as root needs --no-sandbox; the rest keep it from reaching for Google's hosts offline.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH; `make test` installs Debian's package")


def test_page_streams_a_reply(chat_model):
    from playwright.sync_api import expect, sync_playwright

    with running_server(chat_model) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            expect(page.locator("#model")).to_contain_text("tiny")
            page.fill("#temperature", "0")
            page.fill("#input", HELLO)
            page.click("#send")
            expect(page.locator(".msg.user")).to_have_text(HELLO)
            expect(page.locator(".msg.assistant")).to_have_text(HELLO_REPLY, timeout=30_000)
            expect(page.locator("#regenerate")).to_be_enabled()
            page.click("#regenerate")
            expect(page.locator(".msg.assistant")).to_have_text(HELLO_REPLY, timeout=30_000)
            page.click("#reset")
            expect(page.locator(".msg")).to_have_count(0)
        finally:
            browser.close()
