"""The clients keep the design document's names where they do its job, in short scripts."""
import ast
import re

import pytest
from scripts import REPO

#: The document's names -> where docs/ARCHITECTURE.md says they live.
DOCUMENT_NAMES = {
    "bin/Sender.py": ("encrypt_message_hybrid", "send_message", "main"),
    "bin/Receiver.py": ("decrypt_message_hybrid", "receive_messages", "process_messages",
                        "signal_handler", "main"),
}
#: What the scripts call for the machinery -> the library module and method.
MACHINERY = {
    "ciphermq/sender.py": ("Sender.accept", "Sender.deliver"),
    "ciphermq/receiver.py": ("Receiver.store_then_ack", "Receiver.tend_acks",
                             "Receiver.next_batch", "Receiver.connect"),
}
MAX_SCRIPT_LINES = 160


def _defined(path):
    """``{"name", "Class.method"}`` for the functions a file defines at top level."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {"%s.%s" % (node.name, item.name) for item in node.body
                      if isinstance(item, ast.FunctionDef)}
    return names


@pytest.mark.parametrize("path", sorted({**DOCUMENT_NAMES, **MACHINERY}))
def test_the_documents_functions_are_where_the_architecture_page_says(path):
    """Each name in docs/ARCHITECTURE.md's document-to-code table (clients) is defined in the
    file the table gives, and the table mentions it."""
    table = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for name in {**DOCUMENT_NAMES, **MACHINERY}[path]:
        assert name in _defined(path), "%s does not define %s" % (path, name)
        if name != "main":
            assert name.split(".")[-1] in table, "%s is missing from the table" % name


@pytest.mark.parametrize("script", sorted(DOCUMENT_NAMES))
def test_the_scripts_stay_short_enough_to_read_beside_the_document(script):
    """bin/Sender.py and bin/Receiver.py stay within 160 lines: the machinery is in ciphermq/."""
    lines = (REPO / script).read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_SCRIPT_LINES, "%s has %d lines" % (script, lines)


def test_every_file_and_name_the_architecture_page_cites_is_defined_there():
    """Each "`ciphermq/x.py` `Name`" in docs/ARCHITECTURE.md names a class or function that
    file defines: code moved to another module cannot leave the page pointing at the old one."""
    page = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    cited = set(re.findall(r"`(ciphermq/[\w/]+\.py)` `([\w.]+)`", page))
    assert ("ciphermq/ids.py", "MessageIds") in cited
    for path, name in sorted(cited):
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
        assert name in _defined(path) | classes, "%s does not define %s" % (path, name)
