/* Flotilla test guest: kernel parameters parsed the way Linux's parse_args does. */
#include "guest.h"

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/*
 * Space-separated tokens, "key=value" or "key"; double quotes group spaces
 * (key="a b" or "key=a b"); "--" ends the kernel's part (the rest is init's).
 */
void parse_params(const char *s, param_fn fn, void *ctx)
{
	for (;;) {
		while (is_space(*s))
			s++;
		if (!*s)
			return;
		const char *tok = s;
		bool quoted = false;
		size_t eq = 0;
		bool has_eq = false;
		size_t n = 0;
		while (tok[n] && (quoted || !is_space(tok[n]))) {
			if (tok[n] == '"')
				quoted = !quoted;
			else if (tok[n] == '=' && !has_eq) {
				has_eq = true;
				eq = n;
			}
			n++;
		}
		s = tok + n;
		const char *key = tok, *val = NULL;
		size_t keylen = has_eq ? eq : n, vallen = 0;
		if (has_eq) {
			val = tok + eq + 1;
			vallen = n - eq - 1;
		}
		/* Strip one level of quotes like Linux's next_arg(). */
		if (keylen && key[0] == '"') {
			key++;
			keylen--;
			if (!has_eq && keylen && key[keylen - 1] == '"')
				keylen--;
		}
		if (val && vallen && val[0] == '"') {
			val++;
			vallen--;
		}
		if (val && vallen && val[vallen - 1] == '"')
			vallen--;
		if (!has_eq && keylen == 2 && key[0] == '-' && key[1] == '-')
			return;
		if (keylen)
			fn(key, keylen, val, vallen, ctx);
	}
}

bool param_is(const char *key, size_t keylen, const char *name)
{
	size_t n = strlen(name);
	return n == keylen && strncmp(key, name, n) == 0;
}

static int digit_value(char c)
{
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	if (c >= 'A' && c <= 'F') return c - 'A' + 10;
	return 99;
}

/* simple_strtoull(s, &end, 0): "0x" hex, leading "0" octal, else decimal. */
bool parse_uint(const char *s, size_t len, u64 *out, size_t *used)
{
	size_t i = 0;
	u32 base = 10;
	if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X') && len > 2 && digit_value(s[2]) < 16) {
		base = 16;
		i = 2;
	} else if (len >= 1 && s[0] == '0') {
		base = 8;
	}
	u64 v = 0;
	size_t start = i;
	while (i < len && digit_value(s[i]) < (int)base) {
		u64 nv = v * base + (u64)digit_value(s[i]);
		if (nv / base != v)
			return false;          /* overflow */
		v = nv;
		i++;
	}
	if (i == start)
		return false;
	*out = v;
	*used = i;
	return true;
}

/* memparse(): a number with an optional K/M/G/T/P/E suffix. */
bool parse_memsize(const char *s, size_t len, u64 *out, size_t *used)
{
	u64 v;
	size_t n;
	if (!parse_uint(s, len, &v, &n))
		return false;
	u32 shift = 0;
	if (n < len) {
		switch (s[n]) {
		case 'E': case 'e': shift = 60; break;
		case 'P': case 'p': shift = 50; break;
		case 'T': case 't': shift = 40; break;
		case 'G': case 'g': shift = 30; break;
		case 'M': case 'm': shift = 20; break;
		case 'K': case 'k': shift = 10; break;
		}
		if (shift)
			n++;
	}
	if (shift && (v >> (64 - shift)))
		return false;
	*out = v << shift;
	*used = n;
	return true;
}
