package graceful

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStateFile: what a state file holds, and the clear errors of files
// that are truncated, of another format or over the limit; none of them
// yields any payload.
func TestStateFile(t *testing.T) {
	p := &Process{log: slog.New(slog.DiscardHandler)}
	require.NoError(t, p.OfferState("cache", 3, func() ([]byte, error) { return bytes.Repeat([]byte("x"), 1000), nil }))
	require.NoError(t, p.OfferState("empty", 1, func() ([]byte, error) { return nil, nil }))
	require.NoError(t, p.OfferState("broken", 1, func() ([]byte, error) { return nil, errors.New("no") }))
	assert.ErrorContains(t, p.OfferState("", 1, func() ([]byte, error) { return nil, nil }), "want 1 to 255 bytes")
	assert.ErrorContains(t, p.OfferState(strings.Repeat("n", 256), 1, func() ([]byte, error) { return nil, nil }), "want 1 to 255 bytes")
	assert.ErrorContains(t, p.OfferState("x", 1, nil), "nil snapshot")
	var buf bytes.Buffer
	n, size, err := p.writeState(&buf)
	require.NoError(t, err)
	assert.Equal(t, 2, n, "the broken snapshot is left out")
	assert.Equal(t, int64(buf.Len()), size)

	got, err := parseState(buf.Bytes())
	require.NoError(t, err)
	assert.Equal(t, map[string]statePayload{"cache": {3, bytes.Repeat([]byte("x"), 1000)}, "empty": {1, []byte{}}}, got)

	whole := buf.Bytes()
	for cut := 1; cut < len(whole); cut += 97 {
		if cut == len(stateMagic) {
			continue // the magic alone is a valid empty file
		}
		_, err := parseState(whole[:cut])
		assert.Error(t, err, "truncated at %d", cut)
	}
	_, err = parseState([]byte("GIF89a..."))
	assert.EqualError(t, err, "not a state file")
	newer := append([]byte(stateMagic[:len(stateMagic)-1]+"\x02"), whole[len(stateMagic):]...)
	_, err = parseState(newer)
	assert.ErrorContains(t, err, "unknown format")

	f, err := os.CreateTemp(t.TempDir(), "state")
	require.NoError(t, err)
	defer f.Close()
	_, err = f.Write(whole)
	require.NoError(t, err)
	_, err = readState(f, int64(len(whole))-1)
	assert.ErrorContains(t, err, "over the limit")
	got, err = readState(f, int64(len(whole))) // whatever the offset
	require.NoError(t, err)
	assert.Len(t, got, 2)

	// State: the versions this build reads.
	p.state.received = got
	data, v, err := p.State("cache", 3, 4)
	require.NoError(t, err)
	assert.Equal(t, 3, v)
	assert.Len(t, data, 1000)
	_, v, err = p.State("cache", 1, 2)
	assert.EqualError(t, err, `graceful: state "cache": version 3 not understood (this build reads [1 2])`)
	assert.Equal(t, 3, v)
	_, _, err = p.State("nothing")
	assert.ErrorIs(t, err, ErrNoState)
}
