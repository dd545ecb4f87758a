"""Why a cache cannot be used: the miss reasons extract prints (nothing here changes a file)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.cache.key import ALL_SPLITS, DEFAULT_SPLIT_RULE, FORMAT_VERSION, CacheError, SplitManifest
from pipeline.cache.reader import read_attrs, same_data_caches, verify_cache


def _row_changes(old: dict[str, SplitManifest], new: dict[str, SplitManifest]) -> list[str]:
    parts = []
    none = SplitManifest((), (), ())
    for split in [s for s in ALL_SPLITS if s in old or s in new]:
        before, after = old.get(split, none).rows(), new.get(split, none).rows()
        old_paths = {r[0] for r in before}
        new_paths = {r[0] for r in after}
        added, removed = len(new_paths - old_paths), len(old_paths - new_paths)
        changed = len({r[0] for r in after ^ before} & old_paths & new_paths)
        if added or removed or changed:
            parts.append(f"{split}: {added} added, {removed} removed, {changed} changed or relabelled")
    return parts


def _split_change(old: Optional[dict], new: Optional[dict]) -> Optional[str]:
    """How the split rule changed (data.val_dir, val_fraction, test_fraction, split_seed), or None."""
    if new is None or old == new:
        return None
    old = old if isinstance(old, dict) else DEFAULT_SPLIT_RULE
    changed = [f"{k} {old[k]} -> {new[k]}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    changed += [f"{k} = {new[k]}" for k in sorted(set(new) - set(old))]  # the new rule's own settings
    return "the split changed (" + ", ".join(changed) + ")" if changed else None


def miss_reason(path: Path, key: str, config_key: str, manifests: dict[str, SplitManifest],
                split: Optional[dict] = None) -> Optional[str]:
    """None when path holds an intact cache with this key; else why it cannot be used.

    split: the current split rule (extract's data section), named in the reason when it changed."""
    path = Path(path)
    if not path.exists():
        return "no complete cache file yet"
    attrs = read_attrs(path)
    if attrs is None:
        return "cache file is incomplete or unreadable"
    if attrs.get("format_version") != FORMAT_VERSION:
        return f"cache format {attrs.get('format_version')} != {FORMAT_VERSION}"
    if attrs.get("config_key") != config_key:
        return "backbone, weights or preprocessing changed"
    try:
        stored_attrs, old = verify_cache(path)
    except CacheError as e:
        return f"cache file failed verification ({e})"
    if stored_attrs["key"] == key:
        return None
    parts = _row_changes(old, manifests)
    rule = _split_change(stored_attrs.get("split"), split)
    if rule:
        return f"{rule}: " + "; ".join(parts) if parts else rule
    return "images changed (" + "; ".join(parts) + ")" if parts else "class list or image order changed"


def _describe_config_change(old: dict, new: dict) -> str:
    if old.get("format_version") != new.get("format_version"):  # other keys may differ only by format
        return f"cache format changed ({old.get('format_version')} -> {new.get('format_version')})"
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "weights":
            parts.append("weights changed")
        elif k == "preprocess" and isinstance(a, dict) and isinstance(b, dict):
            fields = ", ".join(f"{f} {a.get(f)} -> {b.get(f)}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f))
            parts.append(f"preprocessing changed ({fields})")
        elif k == "taps":  # absent means the default, pool alone
            parts.append(f"taps changed: [{', '.join(a or ['pool'])}] -> [{', '.join(b or ['pool'])}]")
        elif k == "dtype":
            parts.append(f"storage dtype changed ({a} -> {b})")
        else:
            parts.append(f"{k} changed ({a} -> {b})")
    return ", ".join(parts) or "configuration changed"


def explain_new_config(cache_dir: Path, feature_config: dict, data_root: str) -> Optional[str]:
    """Why no cache exists for feature_config, from the newest cache of the same data with another config."""
    newest, newest_mtime = None, -1.0
    for path, attrs in same_data_caches(cache_dir, data_root):
        mtime = path.stat().st_mtime
        if mtime > newest_mtime:
            newest, newest_mtime = attrs, mtime
    if newest is None or newest["versions"] == feature_config:
        return None
    return _describe_config_change(newest["versions"], feature_config)

