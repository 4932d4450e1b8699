#!/usr/bin/env python3
"""Regenerates tests/chat_template/fixtures.json with Python jinja2 as the reference.

server/chat_template_test.cc renders the same templates on the same contexts with the C++
implementation and compares byte for byte. Templates are compiled exactly as transformers'
`apply_chat_template` compiles them (its own `_compile_jinja_template`: an
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, loopcontrols, and the
`raise_exception` / `namespace` / `tojson` overrides), falling back to an equivalent
environment when transformers is not importable.

    .venv/bin/python tests/chat_template/make_fixtures.py

Inputs:
    tests/chat_template/templates/*.jinja   model templates (plus features.jinja)
    SNIPPETS below                          one-line templates for single features
Output:
    tests/chat_template/fixtures.json       {"cases": [{name, template|source, context,
                                              expected | error}]}
A case whose reference render raises stores `error`: the exception text for
raise_exception (the C++ status message must equal it) or "" for other errors (the C++
render must fail too).
"""

import copy
import json
import os
import sys

import jinja2

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")


def compile_template(source):
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        return _compile_jinja_template(source)
    except ImportError:
        pass
    import json as _json
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return _json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                           sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web \"quickly\".\nReturns snippets.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]},
    },
}


def tool_call(name, arguments, as_string):
    return {"id": "call_" + name, "type": "function",
            "function": {"name": name,
                         "arguments": json.dumps(arguments, ensure_ascii=False)
                         if as_string else arguments}}


def tool_conversation(as_string):
    return [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Zürich and Paris? Also search news."},
        {"role": "assistant", "content": "" if not as_string else None,
         "tool_calls": [tool_call("get_weather", {"city": "Zürich", "unit": "celsius"}, as_string),
                        tool_call("get_weather", {"city": "Paris", "days": 2}, as_string)]},
        {"role": "tool", "tool_call_id": "call_get_weather", "content": "{\"temp\": 21}"},
        {"role": "tool", "tool_call_id": "call_get_weather", "content": "{\"temp\": 18.5}"},
        {"role": "assistant", "content": "Zürich is 21°C, Paris 18.5°C.",
         "tool_calls": [tool_call("search", {"query": "news"}, as_string)]},
        {"role": "tool", "tool_call_id": "call_search", "content": "Nothing new."},
        {"role": "assistant", "content": "No news today."},
        {"role": "user", "content": "Thanks!"},
    ]


CONVERSATIONS = {
    "single_user": {"messages": [{"role": "user", "content": "Hello!"}]},
    "system_user": {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"}]},
    "multi_turn": {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "  And a third,\nplease.  "}]},
    "no_system_multi_turn": {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."}]},
    "thinking": {"messages": [
        {"role": "user", "content": "What is 17*3?"},
        {"role": "assistant", "content": "<think>\n17*3 = 51\n</think>\n\nIt is 51."},
        {"role": "user", "content": "And 17*4?"},
        {"role": "assistant", "content": "<think>\n17*4 = 68\n</think>\n\n68."}]},
    "thinking_reasoning_field": {"messages": [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "Done.", "reasoning_content": "\nLet me think...\n"},
        {"role": "user", "content": "Again."}], "enable_thinking": False},
    "tools_dict_arguments": {"messages": tool_conversation(False),
                             "tools": [WEATHER_TOOL, SEARCH_TOOL]},
    "tools_string_arguments": {"messages": tool_conversation(True),
                               "tools": [WEATHER_TOOL, SEARCH_TOOL]},
    "unicode": {"messages": [
        {"role": "system", "content": "Réponds en français. 日本語もOK。"},
        {"role": "user", "content": "Ünïcödé 🎉 «quotes» \"double\" 'single' \\ back\tslash"},
        {"role": "assistant", "content": "Très bien — 好的 👍"},
        {"role": "user", "content": "Ελληνικά и русский"}]},
    "empty_content": {"messages": [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": " "}]},
    "non_alternating": {"messages": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"}]},
    "unknown_role": {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "critic", "content": "meh"}]},
    "multimodal_content": {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Describe"},
                                     {"type": "image_url", "image_url": {"url": "x.png"}},
                                     {"type": "text", "text": "briefly."}]}]},
}

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}

# (name, source, context) for single features; rendered with add_generation_prompt absent.
SNIPPETS = [
    ("ws_trim_blocks", "{% if true %}\nA\n{% endif %}\nB\n", {}),
    ("ws_lstrip_blocks", "  {% if true %}\n  x\n  {% endif %}\n  {{ 'y' }}\n  {# c #}\nz", {}),
    ("ws_minus", "a  \n  {{- 'b' -}}  \n  c {%- if true -%} d {%- endif -%} \n e", {}),
    ("ws_plus", "a\n    {%+ if true %}b{% endif +%}\nc", {}),
    ("ws_comment_minus", "a {#- c -#} b\n{# x #}\nc", {}),
    ("ws_crlf", "a\r\n{% if true %}\r\nb\r\n{% endif %}\r\n", {}),
    ("trailing_newline_once", "x\n\n", {}),
    ("raw", "{% raw %}{{ a }}{% endraw %}|{%- raw -%}  {% x %}  {%- endraw %}", {}),
    ("for_else", "{% for x in [] %}{{ x }}{% else %}empty{% endfor %}", {}),
    ("for_filter", "{% for x in range(10) if x is odd %}{{ loop.index }}:{{ x }} {% endfor %}", {}),
    ("for_unpack", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", {"d": {"b": 1, "a": [1]}}),
    ("for_dict", "{% for k in d %}{{ k }}{% endfor %}", {"d": {"z": 1, "y": 2}}),
    ("for_string", "{% for c in 'héllo' %}{{ c }}.{% endfor %}", {}),
    ("loop_vars", "{% for x in 'abc' %}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.revindex0 }}{{ loop.previtem }}{{ loop.nextitem }}|{% endfor %}", {}),
    ("break_continue", "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i > 4 %}{% break %}{% endif %}{{ i }}{% endfor %}", {}),
    ("loop_scope", "{% set x = 1 %}{% for i in [1, 2] %}{{ x }}{% set x = 5 %}{{ x }}{% endfor %}{{ x }}", {}),
    ("if_scope", "{% if true %}{% set y = 3 %}{% endif %}{{ y }}", {}),
    ("namespace", "{% set ns = namespace(a=1, l=[]) %}{% for i in range(3) %}{% set ns.a = ns.a * 2 %}{% set ns.l = ns.l + [i] %}{% endfor %}{{ ns.a }} {{ ns.l }}", {}),
    ("set_block", "{% set s %}x{{ 1 + 1 }}y{% endset %}[{{ s }}]", {}),
    ("set_tuple", "{% set a, b = 1, 'two' %}{{ a }}{{ b }}", {}),
    ("macro_defaults", "{% macro f(a, b='B', c=none) %}{{ a }}{{ b }}{{ c }}{% endmacro %}{{ f(1) }}|{{ f(1, 2) }}|{{ f(1, c=3) }}", {}),
    ("macro_sees_globals", "{% macro f() %}{{ g }}{% endmacro %}{% set g = 'late' %}{{ f() }}", {}),
    ("ternary", "{{ 'a' if x else 'b' }}{{ 'c' if not x }}|{{ 1 if y else 2 if z else 3 }}", {"x": 0, "y": False, "z": True}),
    ("and_or_values", "{{ 0 or 'x' }} {{ 'a' and 'b' }} {{ none or [] }} {{ 1 and 0 }}", {}),
    ("comparisons", "{{ 1 < 2 < 3 }} {{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 2 >= 2 }} {{ 1 != 2 }} {{ true == 1 }}", {}),
    ("in_operator", "{{ 'a' in 'cat' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'z' not in 'cat' }} {{ 'x' in undefined_thing }}", {}),
    ("concat_tilde", "{{ 'n' ~ 1 ~ none ~ true ~ 2.50 ~ undefined_thing ~ [1] }}", {}),
    ("arith", "{{ 7 // -2 }} {{ -7 % -3 }} {{ 7.5 // 2 }} {{ 7.5 % 2 }} {{ 2 ** -1 }} {{ 10 / 5 }} {{ 3 * 'ab' }} {{ [0] * 3 }} {{ [1] + [2] }} {{ -(3) }} {{ +4 }}", {}),
    ("floats", "{{ 0.1 }} {{ 100.0 }} {{ 1e16 }} {{ 1.5e-5 }} {{ 0.0001 }} {{ 123456789012345.6 }} {{ 1/3 }} {{ 2.0 * 3 }} {{ -0.0 }} {{ 1e300 * 10 }}", {}),
    ("floats_tojson", "{{ [0.1, 1e16, 1.5e-5, 3.0, -2, 1e400 * 0] | tojson }}", {}),
    ("subscripts", "{{ l[0] }} {{ l[-1] }} {{ l[1:] }} {{ l[:2] }} {{ l[::-1] }} {{ l[::2] }} {{ l[10] }}|{{ d['a'] }} {{ d.a }} {{ d.missing }}|{{ s[1] }} {{ s[-2:] }} {{ s[::-1] }} {{ l.0 }}", {"l": [1, 2, 3, 4], "d": {"a": "A"}, "s": "héllo"}),
    ("string_methods", "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.upper() }}|{{ s.lower() }}|{{ s.title() }}|{{ s.capitalize() }}|{{ s.replace('l', 'L') }}|{{ s.replace('l', 'L', 1) }}|{{ s.find('l') }}|{{ s.count('l') }}", {"s": "  hello wOrld  "}),
    ("split_variants", "{{ s.split() }} {{ s.split(' ') }} {{ s.split(',', 1) }} {{ s.rsplit(' ', 1) }} {{ s.splitlines() }} {{ 'a\\nb\\r\\nc'.splitlines() }}", {"s": " a,b  c,d "}),
    ("strip_chars", "{{ '\\n\\nx\\n'.strip('\\n') }}|{{ 'xyhixy'.lstrip('xy') }}|{{ 'abc'.rstrip('c') }}|{{ '\\u3000wide\\u00a0'.strip() }}", {}),
    ("startswith_endswith", "{{ s.startswith('<tool') }} {{ s.endswith('>') }} {{ s.startswith(('a', '<')) }} {{ s.endswith('x') }}", {"s": "<tool_response>"}),
    ("string_format", "{{ '{}-{}'.format(1, 'a') }} {{ '{1}{0}'.format('x', 'y') }} {{ '{a}!'.format(a=[1]) }} {{ '{{lit}}'.format() }} {{ '%s is %d' | format('x', 3) }} {{ '%s' % 'pct' }}", {}),
    ("dict_methods", "{{ d.keys() | list }} {{ d.values() | list }} {{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 'dflt') }} {{ d.items() | list }}", {"d": {"a": 1, "b": [2]}}),
    ("list_methods", "{{ l.index(3) }} {{ l.count(1) }}", {"l": [1, 3, 1]}),
    ("literals", "{{ [1, 'a', [none]] }} {{ {'x': 1, 'y': {'z': true}} }} {{ (1, 2) }} {{ () }} {{ 'adj' 'acent' }} {{ 0x1F }} {{ 1_000 }}", {}),
    ("filters_text", "{{ s | trim }}|{{ s | upper }}|{{ s | lower }}|{{ s | title }}|{{ s | capitalize }}|{{ s | replace(' ', '_') }}|{{ s | length }}|{{ s | wordcount }}", {"s": "  hello-world (big) fun  "}),
    ("filters_default", "{{ u | default('d') }} {{ n | default('d') }} {{ '' | default('d', true) }} {{ u | d('x') }} {{ n | default('d', boolean=true) }}", {"n": None}),
    ("filters_lists", "{{ l | first }} {{ l | last }} {{ l | length }} {{ l | join('-') }} {{ l | reverse | list }} {{ l | sort | list }} {{ l | unique | list }} {{ l | min }} {{ l | max }} {{ l | sum }} {{ 'abc' | list }}", {"l": [3, 1, 2, 1]}),
    ("filters_map_select", "{{ m | map(attribute='n') | list }} {{ m | map(attribute='x', default='-') | join(',') }} {{ m | selectattr('ok') | map(attribute='n') | list }} {{ m | rejectattr('ok') | map(attribute='n') | join }} {{ m | selectattr('n', 'in', ['a', 'c']) | list | length }} {{ ['A', 'b'] | map('lower') | list }} {{ [1, 2, 3, 4] | select('even') | list }} {{ [0, 1, ''] | select | list }} {{ [1, 2, 3] | reject('odd') | list }} {{ m | sort(attribute='n', reverse=true) | map(attribute='n') | join }}", {"m": [{"n": "a", "ok": True}, {"n": "b", "ok": False}, {"n": "c", "ok": 1, "x": "X"}]}),
    ("filters_numbers", "{{ '12' | int }} {{ 'x' | int }} {{ 'x' | int(7) }} {{ '0x1f' | int(base=16) }} {{ 3.9 | int }} {{ '2.5' | float }} {{ 2 | float }} {{ -2.5 | abs }} {{ 2.567 | round(2) }} {{ 2.5 | round }} {{ 2.1 | round(method='ceil') }} {{ true | int }}", {}),
    ("filters_string_of", "{{ 1 | string }} {{ none | string }} {{ [1, 'a'] | string }} {{ {'a': none} | string }} {{ 1.0 | string }} {{ u | string }}|", {}),
    ("filters_items_dictsort", "{{ d | items | list }} {{ d | dictsort }} {{ d | dictsort(reverse=true) }} {{ d | dictsort(by='value') }}", {"d": {"b": 2, "A": 3, "c": 1}}),
    ("tojson_variants", "{{ v | tojson }}\n{{ v | tojson(indent=2) }}\n{{ v | tojson(sort_keys=true) }}\n{{ v | tojson(separators=(',', ':')) }}\n{{ v | tojson(ensure_ascii=true) }}\n{{ [] | tojson(indent=2) }}{{ {} | tojson(indent=4) }}", {"v": {"z": "é\u00e9\"\\\n\t\u0001/<>&'", "a": [1, 2.5, None, True, {"k": []}], "emoji": "🎉"}}),
    ("tests", "{{ 1 is number }} {{ true is number }} {{ 1 is integer }} {{ 1.0 is float }} {{ 's' is string }} {{ {} is mapping }} {{ [] is sequence }} {{ 's' is iterable }} {{ 1 is iterable }} {{ none is none }} {{ u is undefined }} {{ u is defined }} {{ true is true }} {{ 0 is false }} {{ false is false }} {{ true is boolean }} {{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 2 is in [1, 2] }} {{ 'a' is eq 'a' }} {{ 2 is gt 1 }} {{ 'abc' is lower }} {{ 'ABC' is upper }} {{ 1 is sameas 1 }} {{ 'trim' is filter }} {{ 'odd' is test }} {{ x is not none }}", {"x": 1}),
    ("undefined_behaviour", "[{{ u }}][{{ u | length }}][{{ u is defined }}][{{ d.nokey }}][{{ d.nokey is defined }}][{% for x in u %}no{% endfor %}][{{ u | default('D') }}][{{ u == u }}][{{ not u }}]", {"d": {}}),
    ("python_repr", "{{ [\"it's\", 'a\"b', 'both\\'\"', 'nl\\n', 'tab\\t', '\\\\'] }} {{ {'k': ('t', 1)} }} {{ [1.0, -0.5, none, false] }} {{ ns }}", {"ns": None}),
    ("dict_global", "{{ dict(a=1, b='x') }} {{ dict(a=1) | tojson }}", {}),
    ("raise_exception", "{% if true %}{{ raise_exception('Bad role: ' ~ role) }}{% endif %}", {"role": "critic"}),
    ("error_none_plus", "{{ 'a' + none }}", {}),
    ("error_undefined_attr", "{{ u.attr }}", {}),
    ("error_div_zero", "{{ 1 // 0 }}", {}),
    ("generation_tag", "{% for m in messages %}{% generation %}[{{ m }}]{% endgeneration %}{% endfor %}", {"messages": ["a", "b"]}),
]


def render(template, context):
    try:
        return {"expected": template.render(**copy.deepcopy(context))}
    except jinja2.exceptions.TemplateError as e:
        if type(e) is jinja2.exceptions.TemplateError:
            return {"error": str(e)}
        return {"error": ""}
    except Exception:  # TypeError, ZeroDivisionError, ... from the template's expressions
        return {"error": ""}


def main():
    cases = []
    for file in sorted(os.listdir(TEMPLATES)):
        if not file.endswith(".jinja"):
            continue
        with open(os.path.join(TEMPLATES, file), encoding="utf-8", newline="") as f:
            template = compile_template(f.read())
        for conv_name, conv in CONVERSATIONS.items():
            for gen in (False, True):
                context = dict(SPECIAL_TOKENS)
                context.update(copy.deepcopy(conv))
                context["add_generation_prompt"] = gen
                case = {"name": f"{file[:-6]}/{conv_name}/{'gen' if gen else 'nogen'}",
                        "template": file, "context": context}
                case.update(render(template, context))
                cases.append(case)
    for name, source, context in SNIPPETS:
        case = {"name": f"snippet/{name}", "source": source, "context": context}
        case.update(render(compile_template(source), context))
        cases.append(case)
    out = os.path.join(HERE, "fixtures.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"generator": "tests/chat_template/make_fixtures.py",
                   "jinja2_version": jinja2.__version__, "cases": cases},
                  f, ensure_ascii=False, indent=1)
        f.write("\n")
    errors = sum(1 for c in cases if "error" in c)
    print(f"wrote {len(cases)} cases ({errors} expect an error) to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
