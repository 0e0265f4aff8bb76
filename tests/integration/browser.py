"""Selenium on Debian's headless Chromium (`make browser` installs both), for the Prefect 3.9 (v1)
and MLflow 3.17 UIs: a fresh profile per test, an explicit chromedriver so Selenium Manager never
downloads anything, and the performance log to catch requests that leave the machine.

Fields of Prefect's run form are found by their titles, as a person reads them ("Model",
"Conversations/Number of conversations" in a group); each title may carry Prefect's "(Optional)".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

RUN_FORM = "form.flow-run-create-form-v2"
PROPERTY = "contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')"
RUN_NAME_CELL = "[role='gridcell'][col-id='attributes.`Run Name`'] a"


def chromium(profile: Path) -> webdriver.Chrome:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        raise RuntimeError("Chromium or chromedriver is missing: `make browser` installs Debian's "
                           "chromium and chromium-driver (apt-get, as root)")
    profile.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={profile / 'profile'}", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                "--disable-sync"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(driver, log_output=str(profile / "chromedriver.log"))
    d = webdriver.Chrome(service=service, options=options)
    d.set_page_load_timeout(60)
    return d


def external_requests(d, local=("127.0.0.1", "localhost")) -> list[str]:
    """The URLs the pages asked for, since the last call, on hosts other than this machine's."""
    out = []
    for entry in d.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme in ("http", "https", "ws", "wss") and url.hostname not in local:
                out.append(url.geturl())
    return out


def _literal(s: str) -> str:
    if "'" not in s:
        return f"'{s}'"
    return "concat(" + ", \"'\", ".join(f"'{p}'" for p in s.split("'")) + ")"


def _titled(title: str) -> str:
    plain, optional = _literal(title), _literal(f"{title} (Optional)")
    return (f".//div[{PROPERTY}][./div[contains(@class,'p-label__header')]//span[contains(@class,"
            f"'schema-form-property__label')][normalize-space()={plain} or normalize-space()={optional}]]")


def open_run_form(d, prefect_ui: str, deployment_id: str, timeout: float = 60):
    """The deployment's Custom run page, once its form and generated run name are there."""
    d.get(f"{prefect_ui}/deployments/deployment/{deployment_id}/run")
    wait = WebDriverWait(d, timeout)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"{RUN_FORM} .schema-form-property input")))
    name = d.find_element(By.CSS_SELECTOR, f"{RUN_FORM} .flow-run-name-input input")
    wait.until(lambda _: name.get_attribute("value"))
    return d.find_element(By.CSS_SELECTOR, RUN_FORM)


def field(d, path: str):
    """The input, text area or select of the form field titled `path` ("Group/Title" inside a
    group); LookupError if the title is not there once, or the field offers nothing to type into
    (a `None` type switch)."""
    scope = d.find_element(By.CSS_SELECTOR, RUN_FORM)
    for part in path.split("/"):
        hits = scope.find_elements(By.XPATH, _titled(part))
        if len(hits) != 1:
            raise LookupError(f"{len(hits)} form fields titled {part!r} ({path!r})")
        scope = hits[0]
    controls = scope.find_elements(By.XPATH, "./div[contains(@class,'p-label__body')]/fieldset//*[self::input "
                                   "or self::textarea or self::select[not(contains(@class,'--placeholder'))]]")
    if not controls:
        raise LookupError(f"{path!r} has nothing to type into (a type switch set to None?)")
    return controls[0]


def fill(d, path: str, value) -> None:
    """Choose or type a value, as a person does: no type switch is clicked."""
    control = field(d, path)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", control)
    if control.tag_name == "select":
        Select(control).select_by_value(str(value))
    else:
        control.click()
        control.send_keys(Keys.CONTROL, "a")
        control.send_keys(Keys.DELETE)
        control.send_keys(str(value))
    WebDriverWait(d, 5).until(lambda _: control.get_attribute("value") == str(value), f"{path} kept its value")


def set_run_name(d, name: str) -> None:
    control = d.find_element(By.CSS_SELECTOR, f"{RUN_FORM} .flow-run-name-input input")
    control.send_keys(Keys.CONTROL, "a")
    control.send_keys(Keys.DELETE)
    control.send_keys(name)


def submit(d, timeout: float = 30) -> str:
    """Click Submit and wait until the UI leaves the form; the run's name."""
    form = d.find_element(By.CSS_SELECTOR, RUN_FORM)
    name = form.find_element(By.CSS_SELECTOR, ".flow-run-name-input input").get_attribute("value")
    button = form.find_element(By.XPATH, ".//button[@type='submit'][normalize-space()='Submit']")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()
    WebDriverWait(d, timeout).until(lambda _: not d.current_url.split("?")[0].endswith("/run"),
                                    "still on the form: a field was refused")
    return name


def open_runs_table(d, url: str, run_name: str, timeout: float = 90) -> list[str]:
    """Open an MLflow experiment link; once the runs table lists `run_name`, its visible column titles."""
    d.get(url)
    wait = WebDriverWait(d, timeout)
    wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, ".ag-header-row-column .ag-header-cell")))
    wait.until(lambda _: run_name in [(a.get_attribute("textContent") or "").strip()
                                      for a in d.find_elements(By.CSS_SELECTOR, RUN_NAME_CELL)],
               f"run {run_name!r} not in the table")
    return [text for cell in d.find_elements(By.CSS_SELECTOR, ".ag-header-row-column .ag-header-cell")
            if (text := (cell.get_attribute("textContent") or "").strip()) and cell.is_displayed()]


def open_run_page(d, url: str, run_name: str, timeout: float = 60) -> str:
    """Open an MLflow run link; once its title and overview are shown, the page's text."""
    d.get(url)
    wait = WebDriverWait(d, timeout)
    wait.until(EC.visibility_of_element_located(
        (By.XPATH, f"//*[self::h1 or self::h2 or self::h3][normalize-space()={_literal(run_name)}]")))
    wait.until(EC.visibility_of_element_located((By.XPATH, "//*[normalize-space(text())='About this run']")))
    return d.find_element(By.TAG_NAME, "body").text
