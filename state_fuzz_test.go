package graceful

import (
	"bytes"
	"log/slog"
	"maps"
	"testing"
)

// FuzzParseState: parseState never panics, whatever the bytes (a state
// file is up to 1 GiB from another binary); what it accepts is within the
// input, and written again by writeState it parses to the same.
func FuzzParseState(f *testing.F) {
	f.Add([]byte(stateMagic))
	f.Add(append([]byte(stateMagic), 0, 5, 'c', 'a', 'c', 'h', 'e', 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 'x', 'y', 'z'))
	f.Add([]byte("GIF89a"))
	f.Add(append([]byte(stateMagic), 0, 1, 'n', 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := parseState(b)
		if err != nil {
			if got != nil {
				t.Fatalf("an error and payloads: %v", err)
			}
			return
		}
		total := 0
		for _, p := range got {
			total += len(p.data)
		}
		if total > len(b) {
			t.Fatalf("%d bytes of payloads from %d bytes", total, len(b))
		}
		// Written again by writeState itself, where OfferState takes the
		// names (1 to 255 bytes).
		w := &Process{log: slog.New(slog.DiscardHandler)}
		for name, p := range got {
			if w.OfferState(name, p.version, func() ([]byte, error) { return p.data, nil }) != nil {
				return
			}
		}
		var buf bytes.Buffer
		if _, _, err := w.writeState(&buf, int64(total)); err != nil {
			t.Fatalf("written again: %v", err)
		}
		again, err := parseState(buf.Bytes())
		if err != nil {
			t.Fatalf("written again, parsed: %v", err)
		}
		if !maps.EqualFunc(got, again, func(a, b statePayload) bool { return a.version == b.version && bytes.Equal(a.data, b.data) }) {
			t.Fatalf("written again, parsed to something else")
		}
	})
}
