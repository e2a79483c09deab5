"""The fixed prompts of `qcpu bench --lookup / --draft` (speculative decoding): plain chat questions, where
little of the reply is in the prompt, and code edits, where most of it is (a function pasted and asked
back with a small change)."""

from __future__ import annotations

CHAT = [
    "What is the difference between a process and a thread?",
    "Explain what a hash table is to a beginner.",
    "Write a short poem about the sea.",
    "Give three tips for writing readable Python code.",
    "What does the HTTP status code 418 mean?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How does binary search work?",
    "What are the advantages of unit tests?",
    "Explain recursion with a simple example.",
    "What is the capital of Australia, and why was it chosen?",
]

INVENTORY = '''\
def summarize_inventory(items, warehouse, threshold, currency):
    totals = {}
    low_stock = []
    missing_prices = []
    for item in items:
        name = item["name"]
        quantity = item.get("quantity", 0)
        price = item.get("price")
        location = item.get("location", warehouse)
        if price is None:
            missing_prices.append(name)
            continue
        value = quantity * price
        if location not in totals:
            totals[location] = {"count": 0, "value": 0.0, "items": []}
        totals[location]["count"] += quantity
        totals[location]["value"] += value
        totals[location]["items"].append(name)
        if quantity < threshold:
            low_stock.append((name, quantity))
    report = []
    for location, data in sorted(totals.items()):
        line = f"{location}: {data['count']} units worth {data['value']:.2f} {currency}"
        report.append(line)
        for name in sorted(data["items"]):
            report.append(f"  - {name}")
    if low_stock:
        report.append("Low stock:")
        for name, quantity in sorted(low_stock, key=lambda pair: pair[1]):
            report.append(f"  {name}: only {quantity} left")
    if missing_prices:
        report.append("Missing prices:")
        for name in missing_prices:
            report.append(f"  {name}")
    grand_total = sum(data["value"] for data in totals.values())
    report.append(f"Total value: {grand_total:.2f} {currency}")
    return "\\n".join(report)


def parse_items(lines, separator):
    items = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(separator)
        if len(fields) < 2:
            raise ValueError(f"line {number}: expected at least two fields")
        item = {"name": fields[0].strip(), "quantity": int(fields[1])}
        if len(fields) > 2 and fields[2].strip():
            item["price"] = float(fields[2])
        if len(fields) > 3 and fields[3].strip():
            item["location"] = fields[3].strip()
        items.append(item)
    return items
'''

EDIT = [
    "Add type hints to every function in this code. Reply with the whole code only.\n\n```python\n"
    + INVENTORY + "```",
    "Rename the variable `report` to `lines` everywhere in this code. Reply with the whole code only.\n\n"
    "```python\n" + INVENTORY + "```",
    "Add a one-line docstring to each function in this code. Reply with the whole code only.\n\n```python\n"
    + INVENTORY + "```",
]

SETS = {"chat": CHAT, "edit": EDIT}
