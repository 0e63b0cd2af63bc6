"""The DICOM node: results (SR TID 1500, secondary capture), spool and journal, listener (C-STORE SCP), worker,
sender. Needs the ``pacs`` extra (pynetdicom, highdicom); nothing here is imported by the rest of pneumolab."""
