"""The rules in force: the rules file, reloaded when it changes, the last good version kept.

A rules file that does not validate is refused: the previous rules stay active (the last good
rules are kept in the job store, so this holds across restarts) and the refusal (with the JSON
path of each problem) is recorded there for the admin API.
"""

from __future__ import annotations

import logging
import os
import tempfile

from orthanc_plugin.jobs import JobStore
from orthanc_plugin.rules import RulesError, RuleSet, load_rules
from orthanc_plugin.settings import Settings

log = logging.getLogger("readout.rules")
RULES_ERROR = "rules_error"
LAST_GOOD = "rules_last_good"  # survives restarts, so a file broken meanwhile changes nothing


class ActiveRules:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._rules: RuleSet | None = None
        self._mtime: float | None = None

    def validate(self, source: object) -> RuleSet:
        """Parse and check rules (a path, JSON text or parsed JSON) against this installation."""
        return load_rules(source, known_engines=list(self.settings.engines),  # type: ignore[arg-type]
                          known_destinations=list(self.settings.destinations))

    def get(self) -> RuleSet:
        """The active rules, after picking up any change to the file."""
        path = self.settings.rules_path
        mtime = path.stat().st_mtime_ns if path.exists() else None
        if self._rules is None or mtime != self._mtime:
            self._mtime = mtime
            try:
                self._rules = self.validate(path)
                self.store.set_setting(RULES_ERROR, None)
                self.store.set_setting(LAST_GOOD, self._rules.to_json())
                log.info("rules loaded: %d rule(s)", len(self._rules.rules))
            except RulesError as error:
                self.store.set_setting(RULES_ERROR, str(error))
                if self._rules is None:  # e.g. the file broke while the runner was down
                    last_good = self.store.get_setting(LAST_GOOD)
                    self._rules = self.validate(last_good) if last_good else RuleSet(rules=())
                log.error("rules file refused (%d previous rule(s) stay active): %s", len(self._rules.rules), error)
        return self._rules

    def replace(self, text: str) -> RuleSet:
        """Validate new rules and, only if they are good, write them over the file (atomically)."""
        rules = self.validate(text)
        path = self.settings.rules_path
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".rules-", suffix=".json")
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, path)
        return rules

    @property
    def error(self) -> str | None:
        return self.store.get_setting(RULES_ERROR)
