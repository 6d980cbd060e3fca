package graceful

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

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
	n, size, err := p.writeState(&buf, 1000) // the limit counts the payloads, not the file's framing
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

	// An unsealed file is refused (Linux: anyone holding it could shrink it
	// under the mapping); a sealed one is mapped, whatever its offset.
	unsealed, err := stateFile()
	require.NoError(t, err)
	defer unsealed.Close()
	_, err = unsealed.Write(whole)
	require.NoError(t, err)
	if runtime.GOOS == "linux" {
		_, _, err = readState(unsealed, int64(len(whole)))
		assert.ErrorContains(t, err, "not sealed")
	}
	f, err := stateFile()
	require.NoError(t, err)
	defer f.Close()
	_, err = f.Write(whole)
	require.NoError(t, err)
	require.NoError(t, sealState(f))
	_, err = f.Write([]byte("more"))
	if runtime.GOOS == "linux" {
		assert.Error(t, err, "sealed: no more writes")
	}
	_, _, err = readState(f, 999)
	assert.ErrorContains(t, err, "state of 1000 bytes is over the limit of 999")
	got, mapping, err := readState(f, 1000)
	require.NoError(t, err)
	assert.Len(t, got, 2)
	defer unmapState(mapping)

	// Over the limit, nothing is written: the old process does not spend
	// the time to write what its successor would refuse.
	var over bytes.Buffer
	_, _, err = p.writeState(&over, 999)
	assert.ErrorContains(t, err, "state of 1000 bytes is over the limit of 999")
	assert.Zero(t, over.Len(), "nothing written")

	// Duplicate names, and too many payloads.
	dup := append(append([]byte(nil), whole...), whole[len(stateMagic):]...)
	_, err = parseState(dup)
	assert.ErrorContains(t, err, "twice")
	many := []byte(stateMagic)
	for i := range maxStatePayloads + 1 {
		name := strconv.Itoa(i)
		many = binary.BigEndian.AppendUint16(many, uint16(len(name)))
		many = append(many, name...)
		many = binary.BigEndian.AppendUint64(many, 1)
		many = binary.BigEndian.AppendUint64(many, 0)
	}
	_, err = parseState(many)
	assert.ErrorContains(t, err, "more than 4096 payloads")

	// A snapshot that panics or hangs is an error, not the end of the
	// process or of the upgrade.
	_, err = takeSnapshot(func() ([]byte, error) { panic("boom") }, time.Second)
	assert.ErrorContains(t, err, "snapshot panicked: boom")
	release := make(chan struct{})
	defer close(release)
	_, err = takeSnapshot(func() ([]byte, error) { <-release; return nil, nil }, 50*time.Millisecond)
	assert.ErrorContains(t, err, "snapshot took over 50ms")

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
	p.ReleaseState()
	_, _, err = p.State("cache")
	assert.ErrorIs(t, err, ErrNoState, "released")
	p.ReleaseState()
}
